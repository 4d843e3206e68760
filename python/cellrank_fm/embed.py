"""Cell (and gene) embeddings from any model directory, plus an optional UMAP picture.

Cell embedding: the hidden states of a chosen layer pooled per cell — the <cls> token (V2
tokens) or the mean of the gene tokens, special tokens left out. Gene embedding: a gene's
contextual hidden state averaged over every cell it appears in (the cells of the input).
Cells that could not be tokenized get NaN rows, so every input cell keeps its place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cellrank_fm.errors import UserError, atomic_path
from cellrank_fm.outputs import claiming
from cellrank_fm.predict import CHUNK_CELLS, load_for_inference, open_h5ad, tokenized_chunks, write_results


@torch.no_grad()
def embed_tokens(model, tokens: list[np.ndarray], *, layer: int = -1, pooling: str = "mean",
                 special_ids=(), tokens_per_batch: int = 32768, gene_sums: dict | None = None) -> np.ndarray:
    """Pooled hidden states [cells, hidden] (float32) for non-empty token arrays, in order.

    With `gene_sums` (a dict with "sum" [vocab, hidden] float64 and "count" [vocab]), each
    token's hidden state is also added to its gene's running sum.
    """
    from cellrank_fm.batching import pack, token_budget_batches
    from cellrank_fm.model import pool

    device = next(model.parameters()).device
    model.eval()
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    out = np.zeros((len(tokens), model.config.hidden_size), dtype=np.float32)
    for idx in token_budget_batches(lengths, tokens_per_batch, shuffle=False):
        batch = pack([tokens[i] for i in idx], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model.encode(batch, layer=layer)
        hidden = hidden.float()
        out[idx] = pool(hidden, batch, pooling, special_ids).cpu().numpy()
        if gene_sums is not None:
            ids = batch.input_ids
            gene_sums["sum"].index_add_(0, ids.cpu(), hidden.cpu().double())
            gene_sums["count"].index_add_(0, ids.cpu(), torch.ones_like(ids.cpu(), dtype=torch.float64))
    return out


def umap_coords(x: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    try:
        import umap  # umap-learn; optional, imported only when asked for
    except ImportError:
        raise UserError("the UMAP needs the umap-learn package: pip install 'cellrank-fm[umap]'.") from None
    if len(x) < 4:
        raise UserError(f"a UMAP needs at least 4 embedded cells, there are {len(x)}.")
    import warnings

    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(x) - 1), random_state=seed, n_components=2)
    with warnings.catch_warnings():  # a seed makes umap single-threaded, and it says so
        warnings.simplefilter("ignore", UserWarning)
        return reducer.fit_transform(x).astype(np.float32)


@claiming("out_path", "genes_out", "umap_png")
def embed_file(model_dir: str | Path, input_path: str | Path, out_path: str | Path, *, layer: int = -1,
               pooling: str | None = None, genes_out: str | Path | None = None,
               umap_color: str | None = None, umap_png: str | Path | None = None, seed: int = 0,
               tokens_per_batch: int = 32768, chunk_cells: int = CHUNK_CELLS, layer_counts: str | None = None,
               gene_id_column: str | None = None, gene_map=(), device: str = "auto", quiet: bool = False) -> dict:
    """Embed every cell of `input_path` into `out_path` (`obsm["X_cellrank"]`); return a summary."""
    from cellrank_fm.progress import progress_bar

    input_path, out_path = Path(input_path), Path(out_path)
    if out_path.resolve() == input_path.resolve():
        raise UserError("--out must differ from the input file; cellrank never overwrites its input.")
    adata = open_h5ad(input_path)
    n = adata.n_obs
    obs_columns = list(adata.obs.columns)
    adata.file.close()
    if umap_color is not None and umap_color not in obs_columns:
        raise UserError(f"the colour column {umap_color!r} is not in {input_path}; available columns: "
                        f"{', '.join(obs_columns) or 'none'}.")
    if umap_png is not None:
        try:
            import umap  # noqa: F401  (fail before the work, not after)
        except ImportError:
            raise UserError("the UMAP needs the umap-learn package: pip install 'cellrank-fm[umap]'.") from None
    lm = load_for_inference(model_dir, device=device, gene_id_column=gene_id_column, gene_map=gene_map)
    model = lm.model
    n_layers = model.config.num_hidden_layers
    if not -n_layers - 1 <= layer <= n_layers:
        raise UserError(f"--layer {layer} is outside the model's range ({-n_layers - 1}..{n_layers}; "
                        f"0 = embeddings, -1 = last layer).")
    special = (lm.info.cellrank or {}).get("special_tokens") or {}
    special_ids = sorted({int(v) for v in special.values() if v is not None}
                         | {i for k, i in lm.vocabulary.items() if k.startswith("<") and k.endswith(">")})
    pooling = pooling or ("cls" if lm.model_version == "v2" else "mean")
    if pooling == "cls" and lm.vocabulary.get("<cls>") is None:
        raise UserError("--pooling cls needs V2 tokens (a <cls> token first in each cell); use --pooling mean.")
    hidden = model.config.hidden_size
    x = np.full((n, hidden), np.nan, dtype=np.float32)
    ok_all = np.zeros(n, dtype=bool)
    gene_sums = None
    if genes_out is not None:
        v = model.config.vocab_size
        gene_sums = {"sum": torch.zeros(v, hidden, dtype=torch.float64), "count": torch.zeros(v, dtype=torch.float64)}
    with progress_bar("cells", quiet=quiet) as bar:
        task = bar.add_task("embed", total=n)
        for start, tokens, ok in tokenized_chunks(input_path, lm, chunk_cells, layer_counts):
            rows = np.flatnonzero(ok)
            if len(rows):
                x[start + rows] = embed_tokens(model, [tokens[i] for i in rows], layer=layer, pooling=pooling,
                                               special_ids=special_ids, tokens_per_batch=tokens_per_batch,
                                               gene_sums=gene_sums)
            ok_all[start:start + len(ok)] = ok
            bar.update(task, advance=len(ok))
    if not ok_all.any():
        raise UserError(f"no cell of {input_path} could be tokenized with the model's vocabulary; "
                        f"check that its genes are Ensembl IDs or symbols of the same species.")
    obsm = {"X_cellrank": x}
    coords = None
    if umap_png is not None or umap_color is not None:
        coords = np.full((n, 2), np.nan, dtype=np.float32)
        coords[ok_all] = umap_coords(x[ok_all], seed=seed)
        obsm["X_cellrank_umap"] = coords
    write_results(input_path, out_path, {}, obsm,
                  {"cellrank_embedding": {"model": str(model_dir), "layer": int(layer), "pooling": pooling,
                                          "cells": int(n), "untokenized": int((~ok_all).sum())}})
    if coords is not None and umap_png is not None:
        from cellrank_fm.plots import scatter_png

        colours = None
        if umap_color is not None:
            import anndata as ad

            colours = ad.read_h5ad(input_path, backed="r").obs[umap_color].to_numpy()[ok_all]
        scatter_png(coords[ok_all], colours, umap_png, title=f"cellrank embedding ({Path(model_dir).name})",
                    legend_title=umap_color or "")
    genes_written = 0
    if gene_sums is not None:
        genes_written = _write_genes(genes_out, gene_sums, lm)
    return {"cells": int(n), "untokenized": int((~ok_all).sum()), "hidden_size": hidden, "pooling": pooling,
            "layer": layer, "genes": genes_written}


def _write_genes(path, gene_sums: dict, lm) -> int:
    """Mean contextual embedding per gene seen in the input: gene_id, symbol, cells, dim_0...

    Parquet, one row per gene, ordered by token id.
    """
    import pandas as pd

    counts = gene_sums["count"].numpy()
    inv = {i: g for g, i in lm.vocabulary.items()}
    ids = [i for i in np.flatnonzero(counts > 0) if not str(inv.get(i, "<")).startswith("<")]
    means = (gene_sums["sum"].numpy()[ids] / counts[ids, None]).astype(np.float32)
    symbols = lm.info.symbols or {}
    df = pd.DataFrame(means, columns=[f"dim_{k}" for k in range(means.shape[1])])
    df.insert(0, "occurrences", counts[ids].astype(np.int64))
    df.insert(0, "symbol", [symbols.get(inv[i], "") for i in ids])
    df.insert(0, "gene_id", [inv[i] for i in ids])
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return len(ids)
