"""The Typer application that every command module registers on."""

import typer

app = typer.Typer(
    name="cellrank",
    help=(
        "Rank-value transcriptomic foundation models: tokenize raw counts, pretrain and "
        "fine-tune a transformer, and explain its decisions gene by gene.\n\n"
        "Example: cellrank tokenize pbmc.h5ad --out shards/ --model-version v2"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
