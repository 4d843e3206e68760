"""Errors a user can cause, and output that appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator


class UserError(Exception):
    """A problem with the user's input or options.

    The CLI prints the message as one sentence and exits with code 2; never raise it for bugs.
    """


def warn(message: str, collected: list[str] | None = None) -> None:
    """Print `warning: message` on stderr (always, even when quiet) and keep it in `collected`."""
    if collected is not None:
        collected.append(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `final` (file or directory) and move it into place on success.

    On any exception the temporary is removed and `final` is left as it was, so an
    interrupted or failed command never leaves half-written output under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.is_dir() and tmp.is_dir():
        _remove(final)
    os.replace(tmp, final)


def write_json(obj: Any, path: str | os.PathLike, indent: int = 1) -> None:
    """`obj` as JSON (NumPy scalars and arrays as plain numbers and lists), written atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=_jsonable) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):  # NumPy scalars and arrays, without importing NumPy here
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
