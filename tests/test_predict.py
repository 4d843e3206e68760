import hashlib
import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellrank_fm.checkpoint import save_model_dir
from cellrank_fm.inference import predict_tokens
from cellrank_fm.model import BertForMaskedLM, BertForSequenceClassification, preset_config
from cellrank_fm.simulate import simulate_corpus
from cellrank_fm.tokenize import tokenize_in_memory
from cellrank_fm.vocab import content_sha256
from cli_helpers import fails, run

CLASSES = ["alpha", "beta", "gamma"]


def _save(model, path, vocab, medians, labels=CLASSES):
    save_model_dir(model, path, vocab, medians, None,
                   extra_config={"model_version": "v1", "model_input_size": 2048, "label_column": "cell_state",
                                 "vocabulary_sha256": content_sha256(vocab)}, labels=labels)
    return path



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    adata, vocab, medians = simulate_corpus(n_cells=120, n_genes=150, markers_per_state=10, n_drivers=5, seed=3)
    x = adata.X.toarray()
    x[[5, 77]] = 0  # two cells with no gene at all
    # Unseen metadata and a gene outside the vocabulary, as new data would have.
    adata.obs["batch_never_seen"] = np.where(np.arange(adata.n_obs) % 2, "b1", "b2")
    extra = np.random.default_rng(0).poisson(3, size=(adata.n_obs, 1)).astype(np.float32)
    new = ad.AnnData(sp.csr_matrix(np.hstack([x, extra])), obs=adata.obs.copy())
    new.var_names = list(adata.var_names) + ["ENSG00000999999"]
    new.var["ensembl_id"] = list(new.var_names)
    x2 = new.X.toarray()
    x2[9] = 0
    x2[9, -1] = 12  # a cell whose only gene is outside the vocabulary
    new.X = sp.csr_matrix(x2)
    path = tmp / "new.h5ad"
    new.write_h5ad(path)
    torch.manual_seed(0)
    cfg = preset_config("tiny", vocab_size=len(vocab), num_labels=3, pooling="mean", special_token_ids=[0, 1])
    model = BertForSequenceClassification(cfg).eval()
    model_dir = _save(model, tmp / "clf", vocab, medians)
    return tmp, path, model_dir, model, vocab, medians


def test_predict_keeps_every_cell_in_order(setup, capsys):
    tmp, path, model_dir, model, vocab, medians = setup
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp / "pred.h5ad"
    run(["predict", str(model_dir), str(path), "--out", str(out), "-q"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # input untouched
    res = ad.read_h5ad(out)
    src = ad.read_h5ad(path)
    assert list(res.obs_names) == list(src.obs_names)
    assert (res.obs["batch_never_seen"] == src.obs["batch_never_seen"]).all()
    lab = res.obs["cellrank_label"]
    assert list(lab.cat.categories) == CLASSES
    missing = np.flatnonzero(lab.isna().to_numpy())
    assert list(missing) == [5, 9, 77]
    assert np.isnan(res.obs["cellrank_confidence"].to_numpy()[missing]).all()
    proba = res.obsm["cellrank_proba"]
    assert list(res.uns["cellrank_proba_classes"]) == CLASSES
    # Same probabilities as the model gives on the tokens directly, row for row.
    toks = tokenize_in_memory(path, vocab, medians)
    keep = np.flatnonzero(toks.ok)
    expect = predict_tokens(model, [toks.tokens[i] for i in keep])
    np.testing.assert_allclose(proba[keep], expect, atol=1e-5)
    assert (lab.to_numpy()[keep] == np.array(CLASSES)[expect.argmax(1)]).all()
    np.testing.assert_allclose(res.obs["cellrank_confidence"].to_numpy()[keep], expect.max(1), atol=1e-5)
    assert "3 could not be tokenized" in capsys.readouterr().out


def test_predict_errors_exit_2(setup, tmp_path, capsys):
    tmp, path, model_dir, model, vocab, medians = setup
    # A pretrained model without a classification head.
    mlm = BertForMaskedLM(preset_config("tiny", vocab_size=len(vocab)))
    mlm_dir = tmp_path / "mlm"
    save_model_dir(mlm, mlm_dir, vocab, medians)
    code, err = fails(["predict", str(mlm_dir), str(path), "--out", str(tmp_path / "o.h5ad")], capsys)
    assert code == 2 and "without a classifier" in err
    # A vocabulary that does not belong to the weights.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shuffled = dict(vocab)
    genes = [g for g in vocab if not g.startswith("<")]
    shuffled[genes[0]], shuffled[genes[1]] = vocab[genes[1]], vocab[genes[0]]
    (bad / "vocabulary.json").write_text(json.dumps(shuffled))
    code, err = fails(["predict", str(bad), str(path), "--out", str(tmp_path / "o.h5ad")], capsys)
    assert code == 2 and "vocabulary" in err
    # Output over the input.
    code, err = fails(["predict", str(model_dir), str(path), "--out", str(path)], capsys)
    assert code == 2 and "never overwrites" in err
    # Input with none of the model's genes.
    alien = ad.AnnData(sp.csr_matrix(np.ones((4, 3), dtype=np.float32)))
    alien.var_names = ["ENSG00000999991", "ENSG00000999992", "ENSG00000999993"]
    alien.write_h5ad(tmp_path / "alien.h5ad")
    code, err = fails(["predict", str(model_dir), str(tmp_path / "alien.h5ad"), "--out",
                            str(tmp_path / "o.h5ad")], capsys)
    assert code == 2
    assert not (tmp_path / "o.h5ad").exists()


def test_embed_cells_genes_and_umap(setup, tmp_path):
    tmp, path, model_dir, model, vocab, medians = setup
    out = tmp_path / "emb.h5ad"
    run(["embed", str(model_dir), str(path), "--out", str(out), "--genes-out", str(tmp_path / "g.parquet"),
          "--umap-color", "cell_state", "--umap-png", str(tmp_path / "umap.png"), "--layer", "-2", "-q"])
    res = ad.read_h5ad(out)
    x = res.obsm["X_cellrank"]
    assert x.shape == (120, 64)
    assert np.isnan(x[[5, 9, 77]]).all() and not np.isnan(np.delete(x, [5, 9, 77], axis=0)).any()
    # Mean of the gene tokens' hidden states after layer 1 (= -2 of a 2-layer model).
    from cellrank_fm.batching import pack

    toks = tokenize_in_memory(path, vocab, medians)
    b = pack([toks.tokens[0]])
    with torch.no_grad():
        h = model.encode(b, layer=1)
    np.testing.assert_allclose(x[0], h.mean(0).numpy(), atol=1e-5)
    assert res.obsm["X_cellrank_umap"].shape == (120, 2)
    assert (tmp_path / "umap.png").read_bytes()[:4] == b"\x89PNG"
    import pandas as pd

    genes = pd.read_parquet(tmp_path / "g.parquet")
    assert set(genes["gene_id"]) <= set(vocab) and len(genes) > 100
    assert genes.shape[1] == 3 + 64
    row = genes.iloc[0]
    tid = vocab[row["gene_id"]]
    n_cells = sum(int((t == tid).any()) for t in toks.tokens)
    assert row["occurrences"] == n_cells
