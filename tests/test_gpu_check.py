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


def test_the_peers_micro_batches_add_up_to_the_whole_step():
    """The peer accumulates a step in padded micro-batches; their weighted losses must sum to
    the whole step's mean masked-gene loss, and their tokens to the step's real tokens."""
    import numpy as np
    import torch
    import transformers

    from cellrank_fm.batching import pack
    from cellrank_fm.model import preset_config

    gpu_check = _load()
    cfg = preset_config("tiny", vocab_size=64)
    (cells, ids, labels), *_ = gpu_check._pretrain_batches(cfg, np.random.default_rng(0), True, 1, 512)[0]
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**cfg.hf_dict("BertForMaskedLM"))).eval()
    micros = gpu_check._peer_micro_batches(cells, ids, labels, 2 * max(map(len, cells)))
    assert len(micros) > 2 and all(m["input_ids"].shape[0] <= 2 for m in micros)
    assert sum(m["_tokens"] for m in micros) == pack(cells).num_tokens
    b = pack(cells)
    with torch.no_grad():
        whole = model(input_ids=b.padded(torch.from_numpy(ids)), attention_mask=b.key_mask.long(),
                      labels=b.padded(torch.from_numpy(labels), fill=-100)).loss
        parts = sum(model(**{k: v for k, v in m.items() if k[0] != "_"}).loss * m["_weight"] for m in micros)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
