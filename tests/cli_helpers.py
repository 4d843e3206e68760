"""Running the `cellrank` command in-process from tests."""

from __future__ import annotations

from cellrank_fm.cli import main


def exit_code(args) -> int:
    """`cellrank ARGS` in-process; its exit status (0 on success)."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code or 0
    return 0


def run(args) -> None:
    """`cellrank ARGS`, which must succeed."""
    code = exit_code(args)
    assert code == 0, f"cellrank {' '.join(map(str, args))} exited with {code}"


def fails(args, capsys) -> tuple[int, str]:
    """`cellrank ARGS`, which must fail: its exit status and what it wrote to stderr."""
    code = exit_code(args)
    assert code != 0, f"cellrank {' '.join(map(str, args))} succeeded"
    return code, capsys.readouterr().err
