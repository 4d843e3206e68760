"""The `cellrank` command line.

Each command group lives in its own module and registers itself on `app`; heavy imports
(torch, anndata) happen inside the command bodies so `cellrank --help` stays fast.
"""

from __future__ import annotations

import sys

from cellrank_fm.cli.app import app
from cellrank_fm.errors import UserError

# Importing the modules registers their commands on `app`, in help order.
from cellrank_fm.cli import demo as _demo  # noqa: F401,E402
from cellrank_fm.cli import data as _data  # noqa: F401,E402
from cellrank_fm.cli import model as _model  # noqa: F401,E402
from cellrank_fm.cli import classify as _classify  # noqa: F401,E402
from cellrank_fm.cli import interpret as _interpret  # noqa: F401,E402
from cellrank_fm.cli import score as _score  # noqa: F401,E402


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors and OSErrors become one sentence on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # full or read-only disk, permissions, ...: the environment, not a bug
        from cellrank_fm.outputs import describe_os_error

        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left under a final name", file=sys.stderr)
        sys.exit(130)


__all__ = ["app", "main"]
