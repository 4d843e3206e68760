"""Cell (and gene) embeddings from any model directory, plus an optional UMAP picture.

Cell embedding: the hidden states of a chosen layer pooled per cell — the <cls> token (V2
tokens) or the mean of the gene tokens, special tokens left out. Gene embedding: a gene's
contextual hidden state averaged over every cell it appears in (the cells of the input).
Cells that could not be tokenized get NaN rows, so every input cell keeps its place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cellrank_fm.errors import UserError
from cellrank_fm.inference import CHUNK_CELLS, LoadedModel, embed_tokens, tokenized_chunks

if TYPE_CHECKING:
    import anndata
    import pandas as pd


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


def require_umap() -> None:
    """Fail before any work when the UMAP's optional dependency is missing."""
    try:
        import umap  # noqa: F401
    except ImportError:
        raise UserError("the UMAP needs the umap-learn package: pip install 'cellrank-fm[umap]'.") from None


def embed_cells(lm: LoadedModel, adata: anndata.AnnData, *, hidden_layer: int = -1, pooling: str | None = None,
                genes: bool = False, layer: str | None = None, tokens_per_batch: int = 32768,
                chunk_cells: int = CHUNK_CELLS, source: str = "the input", quiet: bool = False) -> tuple[np.ndarray, np.ndarray, str, pd.DataFrame | None]:
    """Cell embeddings [cells, hidden] (NaN rows for cells without a vocabulary gene), which cells
    were tokenized, the pooling used, and with `genes` each gene's mean contextual embedding."""
    import torch

    from cellrank_fm.progress import progress_bar

    model = lm.model
    n_layers = model.config.num_hidden_layers
    if not -n_layers - 1 <= hidden_layer <= n_layers:
        raise UserError(f"--hidden-layer {hidden_layer} is outside the model's range ({-n_layers - 1}..{n_layers}; "
                        f"0 = embeddings, -1 = last layer).")
    if pooling not in (None, "cls", "mean"):
        raise UserError(f"--pooling must be cls or mean, not {pooling!r}.")
    special = (lm.info.cellrank or {}).get("special_tokens") or {}
    special_ids = sorted({int(v) for v in special.values() if v is not None}
                         | {i for k, i in lm.vocabulary.items() if k.startswith("<") and k.endswith(">")})
    pooling = pooling or ("cls" if lm.model_version == "v2" else "mean")
    if pooling == "cls" and lm.vocabulary.get("<cls>") is None:
        raise UserError("--pooling cls needs V2 tokens (a <cls> token first in each cell); use --pooling mean.")
    n, hidden = adata.n_obs, model.config.hidden_size
    x = np.full((n, hidden), np.nan, dtype=np.float32)
    ok_all = np.zeros(n, dtype=bool)
    gene_sums = None
    if genes:
        v = model.config.vocab_size
        gene_sums = {"sum": torch.zeros(v, hidden, dtype=torch.float64), "count": torch.zeros(v, dtype=torch.float64)}
    with progress_bar("cells", quiet=quiet) as bar:
        task = bar.add_task("embed", total=n)
        for start, tokens, ok in tokenized_chunks(adata, lm, chunk_cells, layer):
            rows = np.flatnonzero(ok)
            if len(rows):
                x[start + rows] = embed_tokens(model, [tokens[i] for i in rows], layer=hidden_layer, pooling=pooling,
                                               special_ids=special_ids, tokens_per_batch=tokens_per_batch,
                                               gene_sums=gene_sums)
            ok_all[start:start + len(ok)] = ok
            bar.update(task, advance=len(ok))
    if not ok_all.any():
        raise UserError(f"no cell of {source} could be tokenized with the model's vocabulary; check that its "
                        f"genes are Ensembl IDs or symbols of the same species.")
    return x, ok_all, pooling, None if gene_sums is None else gene_table(gene_sums, lm)


def gene_table(gene_sums: dict, lm: LoadedModel) -> pd.DataFrame:
    """Mean contextual embedding per gene seen in the input: gene_id, symbol, occurrences, dim_0...

    One row per gene, ordered by token id.
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
    return df
