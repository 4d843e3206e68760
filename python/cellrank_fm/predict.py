"""Classify new cells with a fine-tuned model (`cellrank_fm.predict`, `cellrank predict`).

The cells are tokenized in row chunks with the model's own vocabulary, medians and gene set
(a backed AnnData is read chunk by chunk, so the matrix is never loaded whole) and classified
in token-budget batches. Every cell keeps its place: one that could not be tokenized (no
vocabulary gene) gets NaN probabilities and no label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cellrank_fm.inference import CHUNK_CELLS, LoadedModel, predict_tokens, tokenized_chunks

if TYPE_CHECKING:
    import anndata


def class_probabilities(lm: LoadedModel, adata: anndata.AnnData, *, layer: str | None = None,
                        tokens_per_batch: int = 32768, chunk_cells: int = CHUNK_CELLS,
                        quiet: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [cells, classes] (float32; NaN rows for cells without a vocabulary gene) and
    which cells were tokenized."""
    from cellrank_fm.progress import progress_bar

    n = adata.n_obs
    proba = np.full((n, len(lm.labels)), np.nan, dtype=np.float32)
    ok_all = np.zeros(n, dtype=bool)
    with progress_bar("cells", quiet=quiet) as bar:
        task = bar.add_task("predict", total=n)
        for start, tokens, ok in tokenized_chunks(adata, lm, chunk_cells, layer):
            rows = np.flatnonzero(ok)
            if len(rows):
                proba[start + rows] = predict_tokens(lm.model, [tokens[i] for i in rows], tokens_per_batch)
            ok_all[start:start + len(ok)] = ok
            bar.update(task, advance=len(ok))
    return proba, ok_all


def write_predictions(adata: anndata.AnnData, lm: LoadedModel, proba: np.ndarray, ok: np.ndarray,
                      key_added: str = "cellrank") -> None:
    """obs `{key}_label` (categorical, missing where not tokenized) and `{key}_confidence` (the top
    probability), obsm `{key}_proba`, uns `{key}_proba_classes` (its columns) and `{key}` (a record)."""
    import pandas as pd

    classes = lm.labels
    best = np.where(ok, np.nan_to_num(proba, nan=-1).argmax(1), -1)
    confidence = np.where(ok, np.nanmax(np.where(ok[:, None], proba, 0), axis=1), np.nan)
    adata.obs[f"{key_added}_label"] = pd.Categorical.from_codes(best, categories=classes)
    adata.obs[f"{key_added}_confidence"] = confidence.astype(np.float32)
    adata.obsm[f"{key_added}_proba"] = proba
    adata.uns[f"{key_added}_proba_classes"] = np.array(classes, dtype=object)
    adata.uns[key_added] = {"model": str(lm.path), "label_column": str((lm.info.cellrank or {}).get("label_column") or ""),
                            "cells": int(adata.n_obs), "untokenized": int((~ok).sum())}
