"""Apply a model directory to new cells: tokenize them as the model was trained, then
classify (`predict`) or embed (`embed`, in `cellrank_fm.embed`).

Input is an h5ad file. It is read in row chunks (backed mode), each chunk tokenized with the
model's own vocabulary, medians and gene set through the Rust core, and the results are
written into a copy of the input (obs / obsm / uns only, through anndata's element writer),
so the matrix is never loaded whole and the input file is never touched. The copy appears
under its final name only when complete.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cellrank_fm.errors import UserError, atomic_path
from cellrank_fm.genes import GENE_MAP_FILE, GeneMapping, load_mapping
from cellrank_fm.outputs import claiming

CHUNK_CELLS = 32768


@dataclass
class LoadedModel:
    model: object
    info: object  # checkpoint.ModelDirInfo
    vocabulary: dict[str, int]
    medians: dict[str, float]
    model_version: str
    model_input_size: int | None
    gene_set: list[str] | None
    gene_id_column: str | None
    mapping: object | None  # genes.GeneMapping for symbols / aliases / retired IDs


def load_for_inference(model_dir: str | Path, expect: str = "any", device: str = "auto",
                       gene_id_column: str | None = None, gene_map=()) -> LoadedModel:
    """Load a model directory with what tokenizing new data needs, checking the vocabulary.

    `gene_map`: symbol/alias tables (default: the mapping the model's shards were tokenized
    with, saved in the model directory); `gene_id_column`: the var column of the new input
    holding gene IDs (default: the one used in training when the input has it, else var_names).
    """
    from cellrank_fm.checkpoint import load_model_dir
    from cellrank_fm.finetune import GENE_SET_FILE
    from cellrank_fm.train import pick_device

    model_dir = Path(model_dir)
    model, info = load_model_dir(model_dir, expect=expect)
    vocab, medians = info.vocabulary, info.medians
    if not vocab or not medians:
        raise UserError(
            f"{model_dir} lacks vocabulary.json or medians.json, so new cells cannot be tokenized "
            f"as the model was trained; copy them from the shards the model was trained on."
        )
    check_model_vocabulary(model_dir, info, vocab)
    ours = info.cellrank or {}
    version = ours.get("model_version") or ("v2" if "<cls>" in vocab else "v1")
    gene_set = None
    if (model_dir / GENE_SET_FILE).is_file():
        from cellrank_fm.outputs import REMAKE_MODEL, read_json

        gene_set = read_json(model_dir / GENE_SET_FILE, REMAKE_MODEL)
    mapping = None
    if gene_map:
        mapping = load_mapping([str(p) for p in gene_map])
    elif info.gene_map:
        mapping = GeneMapping.from_table(info.gene_map, str(model_dir / GENE_MAP_FILE))
    model.to(pick_device(device))
    model.eval()
    return LoadedModel(model, info, vocab, medians, version, ours.get("model_input_size"), gene_set,
                       gene_id_column or ours.get("gene_id_column"), mapping)


def check_model_vocabulary(model_dir: Path, info, vocab: dict[str, int]) -> None:
    """The vocabulary file must be the one the weights were trained with."""
    from cellrank_fm.vocab import content_sha256

    size = info.config.vocab_size
    top = max(vocab.values()) if vocab else -1
    if top >= size or len(vocab) != size:
        raise UserError(
            f"{model_dir}/vocabulary.json has {len(vocab):,} tokens (largest id {top}) but the model's "
            f"embedding holds {size:,}; the vocabulary does not belong to these weights."
        )
    recorded = (info.cellrank or {}).get("vocabulary_sha256")
    if recorded and recorded != content_sha256(vocab):
        raise UserError(
            f"{model_dir}/vocabulary.json differs from the vocabulary the model was trained with "
            f"(sha256 {content_sha256(vocab)[:12]} vs {recorded[:12]}); restore the original file."
        )


def open_h5ad(path: str | Path):
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise UserError(f"input {path} does not exist.")
    if path.suffix != ".h5ad":
        raise UserError(f"{path} is not an .h5ad file; convert it to AnnData (h5ad) first.")
    try:
        return ad.read_h5ad(path, backed="r")
    except Exception as err:  # noqa: BLE001 - any reading failure is the file's fault
        raise UserError(f"{path} could not be read as an h5ad file ({err}).") from None


def tokenized_chunks(path: Path, lm: LoadedModel, chunk_cells: int = CHUNK_CELLS,
                     layer: str | None = None) -> Iterator[tuple[int, list[np.ndarray], np.ndarray]]:
    """(first row, tokens, ok) for each row chunk of the h5ad, tokenized as the model expects."""
    from cellrank_fm.readers import FILE_ERRORS, unreadable
    from cellrank_fm.tokenize import tokenize_in_memory

    adata = open_h5ad(path)
    column = lm.gene_id_column
    if column is not None and column not in adata.var.columns:
        column = None  # the training input's ID column; this input identifies genes by var_names
    try:
        n = adata.n_obs
        for start in range(0, n, chunk_cells):
            stop = min(n, start + chunk_cells)
            try:
                part = adata[start:stop].to_memory()
            except FILE_ERRORS as err:  # a damaged file fails inside anndata and h5py
                raise unreadable(path, err, f" at rows {start}-{stop}") from None
            res = tokenize_in_memory(
                part, lm.vocabulary, lm.medians, model_version=lm.model_version,
                model_input_size=lm.model_input_size, gene_id_column=column,
                mapping=lm.mapping, gene_set=lm.gene_set, layer=layer,
            )
            yield start, res.tokens, np.asarray(res.ok, dtype=bool)
    finally:
        adata.file.close()


def write_results(input_path: Path, out_path: Path, obs_columns: dict, obsm: dict, uns: dict) -> None:
    """A copy of the input h5ad with columns added to obs, arrays to obsm and entries to uns."""
    import h5py
    from anndata.io import read_elem, write_elem

    if out_path.resolve() == input_path.resolve():
        raise UserError("--out must differ from the input file; cellrank never overwrites its input.")
    with atomic_path(out_path) as tmp:
        shutil.copyfile(input_path, tmp)
        with h5py.File(tmp, "r+") as f:
            obs = read_elem(f["obs"])
            for name, values in obs_columns.items():
                obs[name] = values
            del f["obs"]
            write_elem(f, "obs", obs)
            for group, items in (("obsm", obsm), ("uns", uns)):
                if group not in f:
                    f.create_group(group).attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
                for name, value in items.items():
                    if name in f[group]:
                        del f[group][name]
                    write_elem(f[group], name, value)


@claiming("out_path")
def predict_file(model_dir: str | Path, input_path: str | Path, out_path: str | Path, *,
                 tokens_per_batch: int = 32768, chunk_cells: int = CHUNK_CELLS, layer: str | None = None,
                 gene_id_column: str | None = None, gene_map=(), device: str = "auto",
                 quiet: bool = False) -> dict:
    """Classify every cell of `input_path`; write `out_path`; return a summary."""
    import pandas as pd

    from cellrank_fm.finetune import predict_tokens
    from cellrank_fm.progress import progress_bar

    input_path, out_path = Path(input_path), Path(out_path)
    if out_path.resolve() == input_path.resolve():
        raise UserError("--out must differ from the input file; cellrank never overwrites its input.")
    lm = load_for_inference(model_dir, expect="classifier", device=device, gene_id_column=gene_id_column,
                            gene_map=gene_map)
    if lm.info.architecture != "BertForSequenceClassification" or not lm.info.labels:
        raise UserError(
            f"{model_dir} holds a {lm.info.architecture} without cell labels; `predict` needs a cell "
            f"classifier from `cellrank finetune --label COLUMN`."
        )
    classes = [str(c) for c in lm.info.labels]
    adata = open_h5ad(input_path)
    n = adata.n_obs
    adata.file.close()
    proba = np.full((n, len(classes)), np.nan, dtype=np.float32)
    ok_all = np.zeros(n, dtype=bool)
    with progress_bar("cells", quiet=quiet) as bar:
        task = bar.add_task("predict", total=n)
        for start, tokens, ok in tokenized_chunks(input_path, lm, chunk_cells, layer):
            rows = np.flatnonzero(ok)
            if len(rows):
                proba[start + rows] = predict_tokens(lm.model, [tokens[i] for i in rows], tokens_per_batch)
            ok_all[start:start + len(ok)] = ok
            bar.update(task, advance=len(ok))
    best = np.where(ok_all, np.nan_to_num(proba, nan=-1).argmax(1), -1)
    labels = pd.Categorical.from_codes(best, categories=classes)
    confidence = np.where(ok_all, np.nanmax(np.where(ok_all[:, None], proba, 0), axis=1), np.nan)
    label_column = (lm.info.cellrank or {}).get("label_column")
    write_results(
        input_path, out_path,
        {"cellrank_label": labels, "cellrank_confidence": confidence.astype(np.float32)},
        {"cellrank_proba": proba},
        {"cellrank_proba_classes": np.array(classes, dtype=object),
         "cellrank": {"model": str(model_dir), "label_column": str(label_column or ""),
                      "cells": int(n), "untokenized": int((~ok_all).sum())}},
    )
    counts = pd.Series(labels).value_counts().to_dict()
    return {"cells": int(n), "untokenized": int((~ok_all).sum()), "classes": classes,
            "predicted": {str(k): int(v) for k, v in counts.items()}, "label_column": label_column}
