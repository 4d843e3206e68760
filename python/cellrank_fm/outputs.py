"""Outputs: one writer at a time, temporaries swept, failed runs undone, I/O errors explained.

Every command that writes an output (a directory or a file) claims it for the whole run:

    with claim(out) as output:
        ...                 # look at what is there, refuse or decide to resume
        output.replaced()   # after removing an old output for --overwrite
        ...                 # write

`claim` takes a lock beside the output (`.NAME.lock`, holding the owner's PID), so a second
run on the same output is refused with one sentence instead of interleaving with the first. A
lock left by a killed process is taken over: `flock` locks die with their process, so a stale
lock needs no guessing (filesystems without `flock` fall back to checking the recorded PID).
With the lock held, temporaries a killed run left behind are swept (`.NAME.tmp-XXXXXXXX`
beside the output, temporary files directly inside it). When the output did not exist or was
empty at the claim (or was removed for --overwrite), a failure removes what the run wrote, so
the next run finds the path as it was; an interruption (Ctrl-C, kill) keeps the progress for
`--resume`.

`describe_os_error` turns an OSError into the one sentence the command line prints, and
`damaged` / `read_json` name a corrupt artefact and how to make it again.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from cellrank_fm.errors import UserError, write_json

try:
    import fcntl
except ImportError:  # not POSIX: locks fall back to the recorded PID
    fcntl = None  # type: ignore[assignment]

# Temporaries: atomic_path's `.NAME.tmp-XXXXXXXX` and the shard writer's `.part-NNNNN.parquet.tmp`.
_TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$|^\.part-\d{5}\.parquet\.tmp$")
# flock is not offered everywhere (some network and FUSE filesystems).
_NO_FLOCK = {getattr(errno, n, None) for n in ("ENOLCK", "EOPNOTSUPP", "ENOSYS", "EINVAL")} - {None}


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


class OutputLock:
    """An exclusive lock on one output path, held by this process until `release`."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._flock() if fcntl is not None else None
            if self._fd is None:
                self._fd = self._by_pid()
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.write(self._fd, json.dumps(info).encode())
        except OSError as err:
            self.release()
            # The lock is the first thing written: name the output, not the lock file.
            if err.filename is None or os.fsdecode(err.filename) == str(self.path):
                err.filename = str(self.target)
            raise
        return self

    def _flock(self) -> int | None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise self._busy(holder) from None
            except OSError as err:
                os.close(fd)
                if err.errno in _NO_FLOCK:
                    return None
                raise
            # A holder that was releasing may have unlinked the file we opened: lock the new one.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _by_pid(self) -> int:
        for _ in range(3):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                fd = os.open(self.path, os.O_RDONLY)
                holder = _holder(fd)
                os.close(fd)
                if _alive(holder):
                    raise self._busy(holder) from None
                self.path.unlink(missing_ok=True)  # its process is gone: take the lock over
        raise self._busy({})

    def _busy(self, holder: dict) -> UserError:
        who = f"process {holder['pid']}" if holder.get("pid") else "another process"
        gone = ""
        if holder.get("host") and holder["host"] != socket.gethostname():
            who += f" on {holder['host']}"
            gone = f" (if that run is gone, delete {self.path})"  # its liveness cannot be checked from here
        since = f", running since {holder['started']}" if holder.get("started") else ""
        return UserError(
            f"{self.target} is being written by another cellrank run ({who}{since}); wait for it to "
            f"finish or choose another output{gone}"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked, so no one locks a file about to vanish
        os.close(self._fd)
        self._fd = None


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True  # unreadable: assume held rather than take it from a live run
    if holder.get("host", socket.gethostname()) != socket.gethostname() or sys.platform == "win32":
        return True  # cannot tell from here (on Windows, os.kill would end the process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries a killed run left for `target`; call only while holding its lock."""
    target = Path(target)
    found: list[Path] = []
    if target.parent.is_dir():
        prefix = f".{target.name}.tmp-"
        found += [p for p in target.parent.iterdir() if p.name.startswith(prefix) and _TEMPORARY.match(p.name)]
    if target.is_dir():
        found += [p for p in target.iterdir() if _TEMPORARY.match(p.name)]
    for p in found:
        remove(p)
    return found


def remove(path: Path) -> None:
    """Best effort: cleaning up must never hide the error that made it necessary."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _state(target: Path) -> str:
    if not target.exists():
        return "absent"
    if target.is_dir() and not any(target.iterdir()):
        return "empty"
    return "full"


class Claim:
    """What `claim` yields: the output, and whether a failure now removes what the run wrote."""

    def __init__(self, target: Path, track: bool = True):
        self.target = target
        self.enabled = track  # False: claimed by another process of the same run (a torchrun rank)
        state = _state(target) if track else "full"
        self.undo: str | None = state if state != "full" else None

    def replaced(self) -> None:
        """The old output was removed (--overwrite): a failure from here leaves nothing."""
        self.undo = _state(self.target)

    def keep(self) -> None:
        """Keep whatever is written even if the run fails (e.g. a resumable partial run)."""
        self.undo = None


@contextlib.contextmanager
def claim(target: str | os.PathLike, *, enabled: bool = True) -> Iterator[Claim]:
    """Lock `target`, sweep its stale temporaries, and undo a failed fresh run (module doc).

    `enabled=False` (e.g. ranks other than 0 of a distributed run) claims nothing.
    """
    target = Path(target)
    if not enabled:
        yield Claim(target, track=False)
        return
    lock = OutputLock(target).acquire()
    try:
        sweep_temporaries(target)
        output = Claim(target)
        try:
            yield output
        except KeyboardInterrupt:
            raise
        except BaseException as err:
            if output.undo == "absent":
                remove(target)
            elif output.undo == "empty" and target.is_dir():
                for p in target.iterdir():
                    remove(p)
            if isinstance(err, OSError):
                _with_path(err, target)  # the same error, naming the output when it names no file
            raise
    finally:
        lock.release()


@contextlib.contextmanager
def claim_all(*targets: str | os.PathLike | None) -> Iterator[list[Claim]]:
    """`claim` for several outputs (None entries are skipped), in a fixed order."""
    paths = sorted({Path(t).absolute() for t in targets if t is not None}, key=str)
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(claim(p)) for p in paths]


def claiming(*params: str):
    """Decorator: `claim_all` the outputs a function's parameters `params` name, for the call."""

    def wrap(func):
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with claim_all(*(bound.arguments[p] for p in params)):
                return func(*args, **kwargs)

        return wrapped

    return wrap


def check_new_directory(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write the directory `out` over a file, or over files unless `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory; choose another --out")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace it or choose another --out")


@contextlib.contextmanager
def new_directory(out: str | os.PathLike, overwrite: bool) -> Iterator[Claim]:
    """Claim `out` for a directory written whole (e.g. through `atomic_path`), checked first."""
    with claim(out) as output:
        check_new_directory(out, overwrite)
        yield output


def partial_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def partial_directory(out: str | os.PathLike, record: dict, *, resume: bool, overwrite: bool,
                      has_checkpoint) -> Iterator[tuple[Path, bool]]:
    """A directory built in `.NAME.partial` beside `out` and moved into place once complete.

    Yields (work directory, resuming). `record` (JSON-able: the inputs and settings) is kept
    beside the work, and `resume=True` continues an interrupted run only if it is the same;
    `has_checkpoint(work)` says whether there is progress to resume from. A failure removes the
    work unless it holds a checkpoint (that progress stays for --resume); an interruption
    keeps it.
    """
    out = Path(out)
    work = partial_path(out)
    record = json.loads(json.dumps(record, default=str))
    with claim(out):
        record_path = work / "run.json"
        resuming = resume and has_checkpoint(work) and record_path.is_file()
        if resuming:
            if read_json(record_path, "run again without --resume to start from scratch") != record:
                raise UserError(f"cannot resume {out}: its inputs or settings differ from this run's; rerun with the "
                                "same ones, or without --resume to start again")
        else:
            check_new_directory(out, overwrite)
            if resume:
                print(f"note: {out} has no interrupted run to resume; starting from scratch", file=sys.stderr)
            remove(work)
            work.mkdir(parents=True)
            write_json(record, record_path)
        try:
            yield work, resuming
        except KeyboardInterrupt:
            raise
        except BaseException:
            if not has_checkpoint(work):
                remove(work)
            raise
        record_path.unlink()
        if out.exists():
            remove(out)  # empty, or replaced with --overwrite
        os.replace(work, out)


def _with_path(err: OSError, path: Path) -> OSError:
    """The error itself, naming `path` when it names no file (writes to an open file, Rust)."""
    if err.filename is None:
        with contextlib.suppress(AttributeError, TypeError):
            err.filename = str(path)
    return err


# ---------------------------------------------------------------------------------------------
# OSError -> one sentence.

_FREE = "free some space and run the command again"
_ELSEWHERE = "choose an output location you can write to"
_CAUSES = {
    getattr(errno, name, None): words for name, words in {
        "ENOSPC": ("the disk is full", _FREE),
        "EDQUOT": ("the disk quota is used up", _FREE),
        "EFBIG": ("the file grew past the size the file system or this process's limit (ulimit -f) allows",
                  "write to another disk or raise the limit"),
        "EROFS": ("the file system is read-only", _ELSEWHERE),
        "EACCES": ("permission denied", "check its permissions or " + _ELSEWHERE),
        "EPERM": ("the operation is not permitted", "check its permissions or " + _ELSEWHERE),
        "ENOTDIR": ("a part of the path is a file, not a directory", "choose another path"),
        "EISDIR": ("it is a directory where a file was expected", "choose another path"),
        "ENOENT": ("it does not exist", "check the path"),
        "EEXIST": ("it already exists", "remove it or choose another path"),
        "ENOTEMPTY": ("the directory is not empty", "remove it or choose another path"),
        "ENAMETOOLONG": ("the name is too long", "choose a shorter path"),
        "EMFILE": ("too many files are open", "raise the limit (ulimit -n) and run the command again"),
        "ENFILE": ("too many files are open on this system", "close some programs and run the command again"),
        "EIO": ("the device reported an input/output error", "check the disk and run the command again"),
        "ESTALE": ("the network file handle went stale", "run the command again"),
        "ENOMEM": ("there is not enough memory", "use smaller chunks or a machine with more memory"),
    }.items()
}
_CAUSES.pop(None, None)  # names this platform's errno lacks
# Errors raised with a message only: HDF5's "errno = 28", Rust's "(os error 28)".
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)|\(os error (\d+)\)")


def _message(err: OSError) -> str:
    # Not str(err): once a file name is set on a message-only error, str() drops the message.
    if err.strerror:
        return str(err.strerror)
    return " ".join(str(a) for a in err.args) if err.args else type(err).__name__


def os_errno(err: OSError) -> int | None:
    if err.errno is not None:
        return err.errno
    m = _ERRNO_IN_TEXT.search(_message(err))
    return int(m.group(1) or m.group(2)) if m else None


_WRITE_ERRORS = {getattr(errno, n, None) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS")} - {None}


def _final_name(path: str) -> str:
    """A temporary's final name (`.NAME.tmp-XXXXXXXX` -> NAME): what the user asked to write."""
    p = Path(path)
    if _TEMPORARY.match(p.name):
        return str(p.with_name(re.sub(r"\.tmp(-[0-9a-f]{8})?$", "", p.name[1:])))
    return str(path)


def describe_os_error(err: OSError) -> str:
    """One sentence: the path, the cause in plain words (with the system's own), what to do."""
    code = os_errno(err)
    path = err.filename
    if code in _WRITE_ERRORS and err.filename2 is not None:
        path = err.filename2  # a copy or rename failed writing its destination
    where = _final_name(os.fsdecode(path)) if path is not None else "a file operation"
    if code in _CAUSES:
        cause, advice = _CAUSES[code]
        words = err.strerror or os.strerror(code)  # the system's words, not a whole message
        words = words[:1].lower() + words[1:]
        said = f" ({words})" if words.lower() != cause.lower() else ""
        return f"{where}: {cause}{said}; {advice}"
    text = (_message(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{where}: {text}; check the path and the disk, then run the command again"


# ---------------------------------------------------------------------------------------------
# Damaged artefacts: name the file and how to make it again.

REMAKE_SHARDS = "make the shards again with `cellrank tokenize ... --overwrite`"
REMAKE_MODEL = "restore the model directory from a copy, or train it again"


def damaged(path: str | os.PathLike, err: BaseException, remedy: str) -> UserError:
    what = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return UserError(f"{path} is damaged or incomplete ({what}); {remedy}")


def read_json(path: str | os.PathLike, remedy: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise damaged(path, err, remedy) from None
