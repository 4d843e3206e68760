"""The Python API (`import cellrank_fm as cfm`) on the Kang 2017 PBMCs, through public functions only.

The same cells are used three ways — an AnnData built in memory (never on disk), the same cells
written to .h5ad and opened backed, and the path — and every way must give the same tokens,
probabilities and embeddings. `predict` through the API and through the command line must give
identical probabilities.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellrank_fm as cfm
from cli_helpers import fails, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CELLS_PER_CONDITION = 60
TOKENS = 64  # genes per cell: small, so the tiny models train in seconds


@pytest.fixture(scope="module")
def kang(shared_data, tmp_path_factory):
    """(in-memory AnnData, path of the same cells as .h5ad, Geneformer dictionaries)."""
    full = ad.read_h5ad(shared_data / "sc" / "kang2017_pbmc_ifnb_2k.h5ad")
    rows = np.concatenate([np.flatnonzero(full.obs["condition"] == c)[:CELLS_PER_CONDITION] for c in ("ctrl", "stim")])
    # Built from arrays: this object has no file behind it.
    mem = ad.AnnData(X=full.X[rows].copy(), obs=full.obs.iloc[rows].copy(), var=full.var.copy())
    assert not mem.isbacked and mem.filename is None
    path = tmp_path_factory.mktemp("kang") / "kang_subset.h5ad"
    mem.write_h5ad(path)
    gf = shared_data / "geneformer"
    dicts = dict(vocab=gf / "token_dictionary_gc30M.pkl", medians=gf / "gene_median_dictionary_gc30M.pkl")
    return mem, path, dicts


@pytest.fixture(scope="module")
def trained(kang, tmp_path_factory):
    """Shards of the in-memory and the backed AnnData, a pretrained and a fine-tuned tiny model."""
    mem, path, dicts = kang
    tmp = tmp_path_factory.mktemp("trained")
    kw = dict(model_input_size=TOKENS, gene_id_column="ensembl_id", keep_obs=["condition"], progress=False, **dicts)
    shards_mem = cfm.tokenize(mem, out=tmp / "shards_mem", **kw)
    backed = ad.read_h5ad(path, backed="r")
    shards_backed = cfm.tokenize(backed, out=tmp / "shards_backed", **kw)
    backed.file.close()
    pre = cfm.pretrain(shards_backed, out=tmp / "pretrained", preset="tiny", max_steps=4, tokens_per_batch=4096,
                       device="cpu", progress=False)
    clf = cfm.finetune(shards_backed, out=tmp / "classifier", label="condition", from_model=pre, epochs=10,
                       lr=2e-3, tokens_per_batch=2048, patience=0, device="cpu", progress=False)
    return shards_mem, shards_backed, pre, clf


def test_tokenize_reads_an_in_memory_and_a_backed_anndata_alike(kang, trained):
    mem, path, _ = kang
    shards_mem, shards_backed, _, _ = trained
    assert len(shards_mem) == len(shards_backed) == mem.n_obs
    assert [np.array_equal(a, b) for a, b in zip(shards_mem.tokens(), shards_backed.tokens())] == [True] * mem.n_obs
    assert list(shards_mem.column("condition")) == list(mem.obs["condition"])
    (recorded,) = shards_mem.manifest["inputs"]
    assert recorded["path"] == "AnnData" and recorded["in_memory"] and recorded["kept"] == mem.n_obs
    assert set(shards_backed.column("source")) == {path.name}
    assert max(len(t) for t in shards_mem.tokens()) == TOKENS


def test_tokenize_anndata_is_the_shards_tokenization(kang, trained):
    mem, path, _ = kang
    shards_mem, _, _, clf = trained
    table = cfm.tokenize_anndata(mem, clf)
    assert list(table.index) == list(mem.obs_names)
    assert (table["length"].to_numpy() == shards_mem.lengths).all()
    assert all(np.array_equal(a, b) for a, b in zip(table["input_ids"], shards_mem.tokens()))
    backed_table = cfm.tokenize_anndata(path, clf)
    assert all(np.array_equal(a, b) for a, b in zip(table["input_ids"], backed_table["input_ids"]))


def test_load_model_and_trained_model(trained):
    _, _, pre, clf = trained
    model = cfm.load_model(clf.path, device="cpu")
    assert model.labels == ["ctrl", "stim"]
    assert "cell classifier of 'condition' (ctrl, stim)" in repr(model)
    assert clf.metrics["split"]["test"] == clf.metrics["cells"] > 0
    assert clf.metrics["accuracy"] >= 0.8  # interferon-stimulated genes rank high in stimulated cells
    assert cfm.load_model(pre, device="cpu").labels == []


def test_pretrain_through_the_api_and_the_cli_agree(trained, tmp_path):
    """Same shards and options: the same weights, with the command's defaults (the width-scaled rate)."""
    from safetensors.numpy import load_file

    _, shards_backed, pre, _ = trained
    run(["pretrain", shards_backed.path, "--out", tmp_path / "cli", "--preset", "tiny", "--max-steps", "4",
         "--tokens-per-batch", "4096", "--device", "cpu", "-q"])
    api_weights, cli_weights = load_file(pre.path / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert sorted(api_weights) == sorted(cli_weights)
    for name, value in api_weights.items():
        np.testing.assert_array_equal(value, cli_weights[name], err_msg=name)
    hidden = json.loads((pre.path / "config.json").read_text())["hidden_size"]
    assert json.loads((pre.path / "metrics.json").read_text())["lr"] == pytest.approx(3e-3 * 64 / hidden)


def test_load_model_reads_a_huggingface_geneformer_directory(kang, tmp_path):
    """A checkpoint without our dictionaries takes them as arguments; cells embed as transformers runs it."""
    transformers = pytest.importorskip("transformers")
    import torch

    mem, _, dicts = kang
    cells = mem[:6].copy()
    vocab = pd.read_pickle(dicts["vocab"])
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=2048, hidden_act="relu")
    hf = transformers.BertForMaskedLM(cfg).eval()
    hf.save_pretrained(tmp_path / "gf")
    with pytest.raises(cfm.UserError, match="lacks vocabulary.json or medians.json"):
        cfm.load_model(tmp_path / "gf", device="cpu")
    model = cfm.load_model(tmp_path / "gf", device="cpu", gene_id_column="ensembl_id", **dicts)
    assert model.model_version == "v1" and model.labels == []
    cfm.embed(model, cells, progress=False)
    tokens = cfm.tokenize_anndata(cells, model)["input_ids"]
    assert 0 < len(tokens.iloc[0]) <= 2048
    with torch.no_grad():
        hidden = hf.bert(input_ids=torch.as_tensor(tokens.iloc[0][None].astype(np.int64))).last_hidden_state[0]
    np.testing.assert_allclose(cells.obsm["X_cellrank"][0], hidden.mean(0).numpy(), atol=1e-4)


def test_predict_in_memory_backed_path_and_cli_agree(kang, trained, tmp_path):
    mem, path, _ = kang
    *_, clf = trained
    mem = mem.copy()
    assert cfm.predict(clf, mem, progress=False) is None
    proba = mem.obsm["cellrank_proba"]
    assert proba.shape == (mem.n_obs, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert list(mem.uns["cellrank_proba_classes"]) == ["ctrl", "stim"]
    labels = mem.obs["cellrank_label"]
    assert (labels.to_numpy() == np.array(["ctrl", "stim"])[proba.argmax(1)]).all()
    np.testing.assert_allclose(mem.obs["cellrank_confidence"], proba.max(1), atol=1e-6)
    # The test split's accuracy in metrics.json, recomputed from these predictions.
    split = pd.read_csv(clf.path / "split.csv").set_index("cell_id")
    test = split.index[split["split"] == "test"]
    hits = labels[test].astype(str) == mem.obs["condition"][test].astype(str)
    assert hits.mean() == pytest.approx(clf.metrics["accuracy"])

    backed = ad.read_h5ad(path, backed="r")
    assert cfm.predict(clf, backed, key_added="clf", progress=False) is None
    np.testing.assert_array_equal(backed.obsm["clf_proba"], proba)
    backed.file.close()
    from_path = cfm.predict(clf.path, path, progress=False)
    np.testing.assert_array_equal(from_path.obsm["cellrank_proba"], proba)
    copied = cfm.predict(clf, kang[0], copy=True, progress=False)
    assert "cellrank_proba" in copied.obsm and "cellrank_proba" not in kang[0].obsm

    run(["predict", clf.path, path, "--out", tmp_path / "cli.h5ad", "-q"])
    cli = ad.read_h5ad(tmp_path / "cli.h5ad")
    np.testing.assert_array_equal(cli.obsm["cellrank_proba"], proba)
    assert (cli.obs["cellrank_label"] == labels).all()


def test_embed_in_memory_and_backed(kang, trained):
    import torch

    from cellrank_fm.batching import pack

    mem, path, _ = kang
    _, _, pre, _ = trained
    mem = mem.copy()
    cfm.embed(pre, mem, key_added="X_tiny", hidden_layer=-2, genes=True, progress=False)
    x = mem.obsm["X_tiny"]
    assert x.shape == (mem.n_obs, 64) and not np.isnan(x).any()
    assert mem.uns["tiny_embedding"]["layer"] == -2 and mem.uns["tiny_embedding"]["pooling"] == "mean"
    model = cfm.load_model(pre, device="cpu")
    tokens = cfm.tokenize_anndata(mem, model)["input_ids"]
    with torch.no_grad():
        hidden = model.model.encode(pack([tokens.iloc[3]]), layer=1)  # -2 of a 2-layer model
    np.testing.assert_allclose(x[3], hidden.mean(0).numpy(), atol=1e-5)
    genes = mem.uns["tiny_gene_embeddings"]
    assert {"gene_id", "symbol", "occurrences", "dim_0"} <= set(genes.columns)
    first = genes.iloc[0]
    tid = model.vocabulary[first["gene_id"]]
    assert first["occurrences"] == sum(int((t == tid).sum()) for t in tokens)
    backed = cfm.embed(pre, path, key_added="X_tiny", hidden_layer=-2, progress=False)  # a path: returned
    np.testing.assert_allclose(backed.obsm["X_tiny"], x, atol=1e-6)
    backed.file.close()


def test_explain_result_object(kang, trained, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    mem, path, _ = kang
    *_, clf = trained
    kw = dict(label="condition", per_class=2, method="gradient", samples=8, seed=0, progress=False)
    res = cfm.explain(clf, mem, **kw)
    assert res.classes == ["ctrl", "stim"] and res.values["cell_id"].nunique() == 4
    imp = res.importance
    assert {"mean_abs_shap", "mean_shap", "fraction_expressing", "importance_rank"} <= set(imp.columns)
    stim = imp[imp["class"] == "stim"]
    assert stim["mean_abs_shap"].is_monotonic_decreasing and stim["importance_rank"].tolist()[:3] == [1, 2, 3]
    assert res.top_genes("stim", 3) == stim["gene_symbol"].head(3).tolist()
    assert res.top_genes("stim", 3)[0] != stim["gene_id"].iloc[0]  # symbols, from the input's var
    assert res.plot("beeswarm", cls="stim").get_title().startswith("stim")
    assert res.plot("heatmap").get_title() == "class × gene importance"
    res.write(tmp_path / "shap")
    assert (tmp_path / "shap" / "top_genes_stim.png").read_bytes()[:4] == b"\x89PNG"
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "shap" / "gene_importance.parquet"), imp)
    backed = ad.read_h5ad(path, backed="r")
    pd.testing.assert_frame_equal(cfm.explain(clf, backed, **kw).importance, imp)
    backed.file.close()


def test_perturb_result_object(kang, trained, tmp_path):
    mem, clf = kang[0], trained[3]
    per = cfm.perturb(clf, mem, state_column="condition", start_state="stim", goal_state="ctrl",
                      genes=["ISG15", "IFI6"], as_set=True, max_cells=6, null_genes=5, seed=0, progress=False)
    row = per.genes.iloc[0]
    assert row["gene_symbol"] == "ISG15+IFI6" and 0 < row["n_cells"] <= 6
    assert per.shifts["cell_id"].nunique() <= 6 and per.shifts["is_null"].any()
    assert per.plot().get_xlabel().startswith("mean cosine shift toward ctrl")
    per.write(tmp_path / "pert")
    assert json.loads((tmp_path / "pert" / "settings.json").read_text())["genes"] == ["ENSG00000187608", "ENSG00000126709"]


def test_medians_and_baseline(kang, trained, tmp_path):
    mem, path, dicts = kang
    shards_mem, shards_backed, _, _ = trained
    med = cfm.medians(mem, gene_id_column="ensembl_id", progress=False)
    assert med == cfm.medians(path, gene_id_column="ensembl_id", progress=False)
    assert len(med) > 1000 and all(v > 0 for v in med.values())
    metrics = cfm.baseline(shards_backed, label="condition", n_top_genes=200)
    assert metrics["cells"] == metrics["split"]["test"] and metrics["genes"] == 200
    with pytest.raises(cfm.UserError, match="AnnData held in memory.*pass that AnnData too"):
        cfm.baseline(shards_mem, label="condition")
    # The in-memory AnnData's counts, passed alongside its shards or alone, are the file's counts.
    alongside = cfm.baseline(shards_mem, label="condition", n_top_genes=200, adata=mem)
    assert alongside["confusion_matrix"] == metrics["confusion_matrix"]
    assert alongside["macro_f1"] == metrics["macro_f1"] and alongside["C"] == metrics["C"]
    alone, from_file = (cfm.baseline(x, label="condition", n_top_genes=200) for x in (mem, path))
    assert alone["split"] == from_file["split"] and alone["confusion_matrix"] == from_file["confusion_matrix"]
    assert alone["macro_f1"] == from_file["macro_f1"]
    with pytest.raises(cfm.UserError, match="of the shards is not in the AnnData object"):
        other = mem.copy()
        other.obs_names = [f"x{i}" for i in range(other.n_obs)]
        cfm.baseline(shards_mem, label="condition", adata=other)
    clf = cfm.finetune(shards_mem, out=tmp_path / "clf", label="condition", preset="tiny", epochs=1, tokens_per_batch=2048,
                       device="cpu", progress=False, baseline=mem)
    assert clf.metrics["baseline"]["macro_f1"] == cfm.baseline(shards_backed, label="condition")["macro_f1"]
    assert clf.metrics["token_probe"]["macro_f1"] > 0


def test_errors_are_the_command_lines_sentences(kang, trained, tmp_path, capsys):
    _, path, _ = kang
    _, _, pre, _ = trained
    with pytest.raises(cfm.UserError) as api_error:
        cfm.predict(pre, path, progress=False)
    code, err = fails(["predict", pre.path, path, "--out", tmp_path / "o.h5ad"], capsys)
    assert code == 2 and err.strip() == f"error: {api_error.value}"
    assert "without a classifier" in str(api_error.value)
    with pytest.raises(cfm.UserError, match="unknown --method 'exact'"):
        cfm.explain(pre, path, method="exact")


def test_every_public_function_is_typed_and_has_an_example():
    import inspect

    for name in cfm.__all__:
        fn = getattr(cfm, name)
        if not inspect.isfunction(fn):
            continue
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, name
        untyped = [p for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
        assert not untyped, (name, untyped)
        assert "Example:" in (fn.__doc__ or ""), name


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


HEAVY = {"torch", "anndata", "numpy", "pandas", "scipy", "matplotlib", "polars", "pyarrow", "shap", "sklearn"}


def test_import_and_help_load_no_heavy_module():
    # Start-up time is measured by benches/startup.py; here, what makes it fast: nothing heavy loads.
    assert _modules_after("import cellrank_fm") & (HEAVY | {"typer", "rich"}) == set()
    help_run = "from cellrank_fm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert _modules_after(help_run) & HEAVY == set()


def test_package_attributes_stay_functions_after_their_modules_load():
    import importlib

    api = importlib.import_module("cellrank_fm.api")
    assert set(cfm.__all__) == {*api.__all__, "UserError", "__version__"}  # the lazy list names every function
    for name in ("tokenize", "predict", "embed", "explain", "perturb", "finetune", "pretrain", "medians", "baseline"):
        importlib.import_module(f"cellrank_fm.{name}")  # the stage module, as internal code imports it
        assert getattr(cfm, name) is getattr(api, name), name


def test_no_code_imports_a_stage_module_the_way_the_api_shadows():
    """`import cellrank_fm.predict as m` and string patch targets resolve to the API function."""
    names = "tokenize|predict|embed|explain|perturb|finetune|pretrain|medians|baseline"
    # `import cellrank_fm.predict as m`, `cellrank_fm.predict.name` and "cellrank_fm.predict.name" targets
    pattern = re.compile(rf"import cellrank_fm\.({names}) as|cellrank_fm\.({names})\.[A-Za-z_]")
    offenders = [f"{p.relative_to(REPO)}:{i + 1}" for folder in ("python", "tests", "benches")
                 for p in (REPO / folder).rglob("*.py") if p.name != "test_api.py"
                 for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert offenders == [], "use `from cellrank_fm.X import name` or importlib.import_module: " + ", ".join(offenders)


def test_cli_hidden_layer_and_the_old_layer_spelling(kang, trained, tmp_path, capsys):
    _, path, _ = kang
    _, _, pre, _ = trained
    run(["embed", pre.path, path, "--out", tmp_path / "new.h5ad", "--hidden-layer", "-2", "-q"])
    assert "note:" not in capsys.readouterr().err
    run(["embed", pre.path, path, "--out", tmp_path / "old.h5ad", "--layer", "-2", "-q"])
    assert "--layer -2 names a hidden layer, which is now --hidden-layer -2" in capsys.readouterr().err
    new, old = ad.read_h5ad(tmp_path / "new.h5ad"), ad.read_h5ad(tmp_path / "old.h5ad")
    np.testing.assert_array_equal(new.obsm["X_cellrank"], old.obsm["X_cellrank"])
    assert new.uns["cellrank_embedding"]["layer"] == -2
    code, err = fails(["embed", pre.path, path, "--out", tmp_path / "x.h5ad", "--layer", "counts"], capsys)
    assert code == 2 and "no layer 'counts'" in err  # --layer is the counts layer


def test_gene_set_is_stored_in_the_shards_and_travels_to_the_model(kang, tmp_path):
    from cellrank_fm.shards import ShardSet

    mem, _, dicts = kang
    listed = tmp_path / "genes.txt"
    chosen = sorted(mem.var["ensembl_id"])[::20]
    listed.write_text("\n".join(chosen) + "\n")
    shards = cfm.tokenize(mem, out=tmp_path / "shards", genes=listed, model_input_size=TOKENS,
                          gene_id_column="ensembl_id", keep_obs=["condition"], progress=False, **dicts)
    kept = shards.gene_set
    assert kept and set(kept) <= set(chosen) and kept == sorted(kept)
    assert all(set(t.tolist()) <= {shards.vocabulary[g] for g in kept} for t in shards.tokens())
    listed.unlink()  # the shards carry the genes themselves
    assert ShardSet(shards.path).gene_set == kept
    clf = cfm.finetune(shards, out=tmp_path / "clf", label="condition", preset="tiny", epochs=1,
                       tokens_per_batch=4096, device="cpu", progress=False)
    assert cfm.load_model(clf, device="cpu").gene_set == kept
