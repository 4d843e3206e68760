"""The headline check, minutes on CPU (run with `pytest -m slow tests/test_finetune_kang.py`).

A tiny model is pretrained on the real cells at hand (Kang et al. 2017 PBMCs and Wu et al. 2020
T cells, labels unused), fine-tuned to tell interferon-beta stimulated PBMCs from controls, and
its test macro-F1 is compared with the logistic-regression baseline on the same split, both
printed by one `cellrank finetune --baseline` run. Then the mitochondrial path: the same cells
tokenized with the MitoCarta3.0 genes only, fine-tuned, and `cellrank predict` on the h5ad.
"""

import json

import anndata as ad
import pytest

from cli_helpers import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kang")
    g = shared_data / "geneformer"
    dicts = ["--vocab", str(g / "token_dictionary_gc30M.pkl"), "--medians", str(g / "gene_median_dictionary_gc30M.pkl"),
             "--gene-map", str(g / "gene_name_id_dict_gc30M.pkl"), "--model-input-size", "256", "-q"]
    kang = shared_data / "sc" / "kang2017_pbmc_ifnb_2k.h5ad"
    wu = shared_data / "sc" / "wu2020_tcells_200.h5ad"
    run(["tokenize", str(kang), str(wu), "--out", str(tmp / "corpus"), *dicts])
    run(["tokenize", str(kang), "--out", str(tmp / "kang"), "--keep-obs", "condition", *dicts])
    run(["pretrain", str(tmp / "corpus"), "--out", str(tmp / "pretrained"), "--preset", "tiny",
          "--max-steps", "500", "--tokens-per-batch", "4096", "--lr", "2e-3", "--seed", "0"])
    return tmp, kang, dicts


def test_kang_finetuned_matches_baseline(pretrained, capsys):
    tmp, kang, _ = pretrained
    out = tmp / "classifier"
    run(["finetune", str(tmp / "kang"), "--label", "condition", "--from", str(tmp / "pretrained"),
          "--out", str(out), "--epochs", "10", "--lr", "1e-3", "--tokens-per-batch", "8192", "--baseline", "-q"])
    print(capsys.readouterr().out)
    m = json.loads((out / "metrics.json").read_text())
    print(f"cellrank macro-F1 {m['macro_f1']:.3f}, baseline {m['baseline']['macro_f1']:.3f}")
    assert m["macro_f1"] >= m["baseline"]["macro_f1"] - 0.03


def test_mitochondrial_worked_example(pretrained, shared_data, tmp_path):
    tmp, kang, dicts = pretrained
    mito = tmp_path / "mito_shards"
    run(["tokenize", str(kang), "--out", str(mito), "--genes", str(shared_data / "genes" / "Human.MitoCarta3.0.csv"),
          "--keep-obs", "condition", *dicts])
    out = tmp_path / "mito_classifier"
    # Mitochondrial genes are few per cell, so batches of 2,048 tokens give enough steps.
    run(["finetune", str(mito), "--label", "condition", "--from", str(tmp / "pretrained"), "--out", str(out),
          "--epochs", "20", "--lr", "1e-3", "--tokens-per-batch", "2048", "--patience", "8", "--baseline", "-q"])
    m = json.loads((out / "metrics.json").read_text())
    print(f"mitochondrial genes only: cellrank macro-F1 {m['macro_f1']:.3f}, baseline {m['baseline']['macro_f1']:.3f}")
    assert m["macro_f1"] > 0.7  # mitochondrial genes carry part of the interferon response
    pred = tmp_path / "kang.mito.h5ad"
    run(["predict", str(out), str(kang), "--out", str(pred), "-q"])
    res = ad.read_h5ad(pred)
    assert res.n_obs == 2000 and res.obsm["cellrank_proba"].shape == (2000, 2)
    assert res.obs["cellrank_label"].notna().sum() > 1900
