"""benches/gpu_check.py's CPU dry run (`--device cpu --smoke`), so the prepared GPU check cannot rot."""

import importlib.util
import json
from pathlib import Path

import cellrank_fm.accel as accel

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_passes_every_part_and_writes_one_json(tmp_path, capsys):
    gpu_check = _load()
    out = tmp_path / "check.json"
    rc = gpu_check.main(["--device", "cpu", "--smoke", "--out", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0, {k: v.get("error") for k, v in record["parts"].items()}
    assert list(record["parts"]) == list(gpu_check.PARTS)
    assert not [name for name, part in record["parts"].items() if "error" in part]
    assert len(record["checks"]) > 20 and all(c["ok"] for c in record["checks"])
    assert record["parts"]["pretrain"]["tiny"]  # ours and transformers both measured
    assert record["parts"]["explain"]["pathway_game"]["sets_playing"] > 1
    perturb = record["parts"]["perturb"]
    assert perturb["perturbations_timed"] > 0 and perturb["job_hours_1500_cells"] > 0
    assert perturb["peer_perturbations_per_s"] > 0  # the Geneformer-style peer ran too
    table = capsys.readouterr().out
    assert table.count("| numerics") == 5 and "| pretrain" in table and "| perturb" in table


def test_a_numerical_mismatch_makes_the_check_fail(tmp_path, monkeypatch):
    gpu_check = _load()
    real = accel.reference_varlen_attn

    def off_by_scale(q, k, v, *args, **kw):  # a kernel that scales the scores wrongly
        return real(q, k, v, *args, **{**kw, "scale": 0.5})

    monkeypatch.setattr(accel, "reference_varlen_attn", off_by_scale)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--smoke", "--parts", "numerics", "--out", str(out)]) == 1
    assert not json.loads(out.read_text())["ok"]
