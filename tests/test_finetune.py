import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from cellrank_fm.checkpoint import read_weights, save_model_dir
from cellrank_fm.finetune import EarlyStopping
from cellrank_fm.model import BertForMaskedLM, preset_config
from cellrank_fm.simulate import planted, simulate_corpus
from cellrank_fm.splits import make_split
from cellrank_fm.vocab import save_json_mapping
from cli_helpers import fails, run



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Simulated cells (small libraries, so cells differ in which genes they express), tokenized."""
    tmp = tmp_path_factory.mktemp("ft")
    adata, vocab, medians = simulate_corpus(n_cells=300, n_genes=300, library_size=400, n_donors=6, seed=2)
    h5ad = tmp / "cells.h5ad"
    adata.write_h5ad(h5ad)
    save_json_mapping(vocab, tmp / "vocab.json")
    save_json_mapping(medians, tmp / "medians.json")
    run(["tokenize", str(h5ad), "--out", str(tmp / "shards"), "--vocab", str(tmp / "vocab.json"),
          "--medians", str(tmp / "medians.json"), "--keep-obs", "cell_state,donor", "-q"])
    return tmp, h5ad, adata, vocab, medians


def test_finetune_learns_and_predict_agrees(corpus, capsys):
    tmp, h5ad, adata, vocab, medians = corpus
    out = tmp / "clf"
    run(["finetune", str(tmp / "shards"), "--label", "cell_state", "--preset", "tiny", "--out", str(out),
          "--epochs", "8", "--lr", "3e-3", "--tokens-per-batch", "4096", "--patience", "0", "--baseline",
          "--seed", "1", "-q"])
    printed = capsys.readouterr().out
    assert "macro-F1" in printed and "baseline" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "labels.json").read_text()) == ["alpha", "beta", "gamma"]
    assert m["cells"] == 30 and np.array(m["confusion_matrix"]).sum() == 30
    assert m["macro_f1"] > 0.8  # chance is about 0.33
    assert m["baseline"]["macro_f1"] > 0.9
    for f in ("config.json", "model.safetensors", "vocabulary.json", "medians.json", "confusion_matrix.png",
              "split.csv", "validation_curve.png"):
        assert (out / f).is_file(), f
    # The split is the shared one: same cells as make_split on the same ids, labels and seed.
    split_csv = pd.read_csv(out / "split.csv")
    s = make_split(list(split_csv["cell_id"]), list(split_csv["label"]), seed=1)
    assert list(split_csv["split"]) == list(s.assignment())
    # Predicting the test cells from the raw h5ad gives the figures finetune reported.
    pred = tmp / "pred.h5ad"
    run(["predict", str(out), str(h5ad), "--out", str(pred), "-q"])
    res = ad.read_h5ad(pred).obs.loc[split_csv.loc[split_csv["split"] == "test", "cell_id"]]
    acc = float((res["cellrank_label"].astype(str) == res["cell_state"].astype(str)).mean())
    assert acc == pytest.approx(m["accuracy"], abs=1e-9)


def test_missing_label_column_names_the_kept_columns(corpus, capsys):
    tmp = corpus[0]
    code, err = fails(["finetune", str(tmp / "shards"), "--label", "condition", "--preset", "tiny",
                            "--out", str(tmp / "nope")], capsys)
    assert code == 2
    assert "'condition'" in err and "cell_state, donor" in err and "--keep-obs" in err
    assert not (tmp / "nope").exists()


def test_freeze_early_stop_and_group_split(corpus, tmp_path):
    tmp, h5ad, adata, vocab, medians = corpus
    torch.manual_seed(0)
    pre = tmp_path / "pre"
    save_model_dir(BertForMaskedLM(preset_config("tiny", vocab_size=len(vocab))), pre, vocab, medians)
    out = tmp_path / "clf"
    run(["finetune", str(tmp / "shards"), "--label", "cell_state", "--from", str(pre), "--out", str(out),
          "--freeze-layers", "1", "--epochs", "2", "--evals-per-epoch", "1",
          "--tokens-per-batch", "4096", "--split-by", "donor", "-q"])
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["validation_history"]) == 2 and m["steps"] == 2 * m["steps_per_epoch"]
    before, after = read_weights(pre), read_weights(out)
    for k in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        assert torch.equal(before[k], after[k]), k
    k = "bert.encoder.layer.1.attention.self.query.weight"
    assert not torch.equal(before[k], after[k])
    split = pd.read_csv(out / "split.csv").merge(
        adata.obs[["donor"]].astype(str), left_on="cell_id", right_index=True)
    assert split.groupby("donor")["split"].nunique().max() == 1
    assert set(split["split"]) == {"train", "validation", "test"}


def test_early_stopping_waits_for_the_loss_and_the_minimum_epochs():
    # F1 flat but the loss still falling: no stop.
    es = EarlyStopping(patience=2, min_epochs=1)
    for epoch, loss in enumerate([1.0, 0.9, 0.8, 0.7], 1):
        assert es.update(0.5, loss, epoch) and not es.stop  # equal F1, lower loss: a new best
    assert es.best_eval == 3  # equal F1: the lower loss wins
    # Neither improves for two evaluations: stop, but only once min_epochs is reached.
    es = EarlyStopping(patience=2, min_epochs=4)
    for epoch, (f1, loss) in enumerate([(0.6, 1.0), (0.5, 1.0), (0.55, 1.00005)], 1):
        es.update(f1, loss, epoch)
    assert not es.stop and es.since_progress == 2 and es.best_eval == 0
    es.update(0.59, 1.2, 4)
    assert es.stop
    # A higher F1 resets the count even when the loss rises.
    es = EarlyStopping(patience=1, min_epochs=0)
    es.update(0.5, 1.0, 1)
    assert es.update(0.6, 2.0, 2) and not es.stop
    assert not es.update(0.6, 2.0, 3) and es.stop


def test_gene_classification_cross_validates_over_genes(corpus, tmp_path, capsys):
    tmp, h5ad, adata, vocab, medians = corpus
    truth = planted(adata)
    markers = [g for genes in truth["markers"].values() for g in genes]
    others = [g for g in adata.var_names if g not in set(markers) | set(truth["drivers"])][:60]
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"background": others[:60], "marker": (markers + [""] * 60)[:60]}).replace("", np.nan).to_csv(
        csv, index=False)
    out = tmp_path / "genes"
    run(["finetune", str(tmp / "shards"), "--task", "genes", "--gene-labels", str(csv), "--preset", "tiny",
          "--folds", "3", "--epochs", "2", "--lr", "3e-3", "--tokens-per-batch", "4096",
          "--out", str(out), "-q"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["background", "marker"] and m["genes"] == 120
    assert [f["test_genes"] for f in m["folds"]] == [40, 40, 40]
    assert all(0.0 <= f["roc_auc"] <= 1.0 for f in m["folds"])
    # Markers rise in rank where their state is active; held-out markers are told apart from
    # background genes better than chance (0.5) even by a model trained from scratch.
    assert m["roc_auc_mean"] > 0.55
    assert (out / "roc.png").is_file()
    # The final model, trained on all 120 labelled genes, scores every gene that occurs.
    scores = pd.read_csv(out / "gene_scores.csv", keep_default_na=False)
    assert m["scored_genes"] == len(scores) > 120 and set(scores["gene"]) <= set(vocab)
    assert (scores["occurrences"] > 0).all()
    np.testing.assert_allclose(scores["p_background"] + scores["p_marker"], 1.0, atol=1e-6)
    labelled = scores[scores["label"] != ""]
    assert len(labelled) == 120 and set(labelled["label"]) == {"background", "marker"}
    mean_p = labelled.groupby("label")["p_marker"].mean()
    assert mean_p["marker"] > mean_p["background"]  # it learned its training genes
    assert json.loads((out / "model" / "labels.json").read_text()) == ["background", "marker"]
    code, err = fails(["predict", str(out / "model"), str(h5ad), "--out", str(tmp_path / "p.h5ad")], capsys)
    assert code == 2 and "gene classifier" in err


def test_model_dir_carries_the_gene_map(corpus, tmp_path):
    """Shards tokenized from symbols keep the mapping; the model carries it, so predict resolves
    symbol-named cells after the mapping file is gone."""
    tmp, h5ad, adata, vocab, medians = corpus
    symbols = [f"GENE{i}" for i in range(adata.n_vars)]
    gene_map = tmp_path / "map.csv"
    gene_map.write_text("gene_id,symbol\n" + "".join(f"{g},{s}\n" for g, s in zip(adata.var_names, symbols)))
    named = adata.copy()
    named.var_names = symbols
    by_symbol = tmp_path / "symbols.h5ad"
    named.write_h5ad(by_symbol)
    run(["tokenize", str(by_symbol), "--out", str(tmp_path / "shards"), "--vocab", str(tmp / "vocab.json"),
          "--medians", str(tmp / "medians.json"), "--gene-map", str(gene_map), "--keep-obs", "cell_state", "-q"])
    saved = json.loads((tmp_path / "shards" / "gene_map.json").read_text())
    assert saved["GENE7"] == adata.var_names[7] and set(saved.values()) <= set(vocab)
    run(["finetune", str(tmp_path / "shards"), "--label", "cell_state", "--preset", "tiny", "--out",
          str(tmp_path / "clf"), "--epochs", "1", "--tokens-per-batch", "4096", "--seed", "1", "-q"])
    assert json.loads((tmp_path / "clf" / "gene_map.json").read_text()) == saved
    gene_map.unlink()
    moved = tmp_path / "moved"
    (tmp_path / "clf").rename(moved)
    for name, path in [("ids", h5ad), ("symbols", by_symbol)]:
        run(["predict", str(moved), str(path), "--out", str(tmp_path / f"pred-{name}.h5ad"), "-q"])
    ids, syms = ad.read_h5ad(tmp_path / "pred-ids.h5ad"), ad.read_h5ad(tmp_path / "pred-symbols.h5ad")
    assert ids.obs["cellrank_label"].notna().all()
    np.testing.assert_allclose(syms.obsm["cellrank_proba"], ids.obsm["cellrank_proba"], atol=1e-6)
