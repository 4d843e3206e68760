"""atomic_path: output appears whole under its final name or not at all."""

from __future__ import annotations

import pytest

from cellrank_fm.errors import UserError, atomic_path


def test_file_moves_into_place_on_success(tmp_path):
    final = tmp_path / "out" / "table.csv"
    with atomic_path(final) as tmp:
        tmp.write_text("a,b\n")
        assert not final.exists()
    assert final.read_text() == "a,b\n"
    assert sorted(p.name for p in final.parent.iterdir()) == ["table.csv"]


def test_failure_keeps_previous_output_and_leaves_no_temp(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "config.json").write_text("old")
    with pytest.raises(UserError):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text("new, half written")
            raise UserError("stop")
    assert (final / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_directory_replaces_previous_on_success(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "stale.bin").write_text("x")
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]
