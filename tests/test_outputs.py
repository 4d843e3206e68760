"""Output claims: locks, temporaries, undoing failed runs, and OSErrors in one sentence."""

from __future__ import annotations

import errno
import json
import os

import pytest

from cellrank_fm import outputs
from cellrank_fm.errors import UserError
from cellrank_fm.outputs import OutputLock, claim, describe_os_error, lock_path, sweep_temporaries


def test_os_errors_read_as_one_sentence_naming_the_output():
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/d/out")) == (
        "/d/out: the disk is full (no space left on device); free some space and run the command again")
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system", "/d/out")).startswith(
        "/d/out: the file system is read-only (read-only file system); choose an output location")
    assert describe_os_error(OSError(errno.EACCES, "Permission denied", "/d/out")) == (
        "/d/out: permission denied; check its permissions or choose an output location you can write to")
    # A copy or rename that failed writing names its destination, by its final name.
    copy = OSError(errno.EFBIG, "File too large", "/d/in.h5ad", None, "/d/.p.h5ad.tmp-0123abcd")
    assert describe_os_error(copy).startswith("/d/p.h5ad: the file grew past the size")
    # Errors raised with a message only (Rust, HDF5) still say why.
    rust = OSError("cannot write /d/.part-00001.parquet.tmp: No space left on device (os error 28)")
    rust.filename = "/d/shards"
    assert describe_os_error(rust).startswith("/d/shards: the disk is full")
    hdf5 = OSError("Can't write data (file write failed: errno = 122, error message = 'Disk quota exceeded')")
    assert outputs.os_errno(hdf5) == 122
    assert describe_os_error(OSError(errno.ECONNRESET, "Connection reset by peer", "/d/x")) == (
        "/d/x: Connection reset by peer; check the path and the disk, then run the command again")


@pytest.mark.parametrize("before", ["absent", "empty", "full"])
def test_a_failed_run_leaves_the_output_as_it_found_it(tmp_path, before):
    out = tmp_path / "out"
    if before != "absent":
        out.mkdir()
    if before == "full":
        (out / "keep.txt").write_text("earlier results")
    with pytest.raises(ValueError), claim(out):
        out.mkdir(exist_ok=True)
        (out / "part-00000.parquet").write_text("half")
        raise ValueError("bad input")
    expected = {"absent": None, "empty": [], "full": ["keep.txt", "part-00000.parquet"]}[before]
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if before == "absent" else ["out"])


def test_interrupted_runs_keep_their_progress_and_replaced_outputs_are_undone(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), claim(out):
        out.mkdir()
        (out / "part-00000.parquet").write_text("whole")
        raise KeyboardInterrupt
    assert (out / "part-00000.parquet").is_file()  # for --resume
    with pytest.raises(OSError) as caught, claim(out) as output:
        outputs.remove(out)  # --overwrite
        output.replaced()
        out.mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")  # a write to an open file: no name
    assert not out.exists()
    assert caught.value.filename == str(out)  # the output is named for the message


def test_only_cellrank_temporaries_are_swept(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    ours = [tmp_path / ".shards.tmp-0123abcd", out / ".manifest.json.tmp-89abcdef", out / ".part-00003.parquet.tmp"]
    theirs = [tmp_path / ".shards.tmp-keep", tmp_path / ".other.tmp-0123abcd", out / "notes.tmp", out / "part-00001.parquet"]
    for p in ours + theirs:
        p.write_text("x")
    assert sorted(sweep_temporaries(out)) == sorted(ours)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)


def test_one_writer_per_output_and_the_lock_goes_with_it(tmp_path):
    out = tmp_path / "model"
    first = OutputLock(out).acquire()
    assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match=rf"model is being written by another cellrank run \(process {os.getpid()}, running since"):
        OutputLock(out).acquire()
    first.release()
    assert not lock_path(out).exists()
    OutputLock(out).acquire().release()


def test_without_flock_a_dead_holders_lock_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "fcntl", None)  # e.g. a filesystem without flock
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with pytest.raises(UserError, match=f"process {os.getpid()}"):
        OutputLock(out).acquire()  # its holder is alive
    lock_path(out).write_text(json.dumps({"pid": 2**22 + 17, "host": os.uname().nodename}))
    lock = OutputLock(out).acquire()  # its holder is gone
    assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path(out).exists()
