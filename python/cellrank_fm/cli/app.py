"""The Typer application that every command module registers on."""

from typing import Annotated

import typer

app = typer.Typer(
    name="cellrank",
    help=(
        "Rank-value transcriptomic foundation models: tokenize raw counts, pretrain and "
        "fine-tune a transformer, and explain its decisions gene by gene.\n\n"
        "Start with [bold]cellrank demo[/bold] (offline, minutes on a CPU); every command has --help "
        "with an example.\n\n"
        "Example: cellrank tokenize pbmc.h5ad --out shards/ --vocab token_dictionary_gc30M.pkl "
        "--medians gene_median_dictionary_gc30M.pkl --keep-obs condition"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        from cellrank_fm import __version__

        typer.echo(f"cellrank {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    # Options of `cellrank` itself, before any command; no docstring, so the help above stands.
    pass
