"""An honest baseline: logistic regression on log-normalised highly variable genes.

It uses the same split (same function, same seed, keyed on cell ids) as `finetune`, so the two
test figures are directly comparable. Given a shard directory it reads the raw counts back from
the input files recorded in the manifest (`source` + `cell_id` link each row to its cell); an
AnnData held in memory, which has no file to read back, is passed alongside.
Counts stream through in row chunks twice: once over the training cells for gene statistics,
once to gather the selected genes of the kept cells as a sparse matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp

from cellrank_fm.errors import UserError
from cellrank_fm.metrics import classification_metrics
from cellrank_fm.splits import SHARD_HINT, Split, split_cells
from cellrank_fm.tokenize import in_memory_names, is_anndata

CHUNK_ROWS = 8192


@dataclass
class CellTable:
    """The cells a baseline trains on: ids, their metadata columns, and where their counts are.

    `rows[i]` = (input file index, row within that file) of cell i.
    """

    cell_ids: list[str]
    columns: dict[str, object]  # name -> values per cell
    files: list[Any]  # input file paths, or AnnData objects held in memory
    rows: np.ndarray  # int64 [cells, 2]
    layer: str | None = None
    from_shards: bool = False
    # Gene name per input column (None = not used), given the reader; default: var_names. For
    # shards: the resolved IDs of exactly the genes the tokenizer used (vocabulary, gene set).
    column_names: Callable | None = None

    def names_for(self, reader) -> list[str | None]:
        return self.column_names(reader) if self.column_names else list(reader.var_names)


def _open(source, layer: str | None = None):
    """A reader over an input file, or over an AnnData object held in memory."""
    from cellrank_fm.readers import AnnDataReader, open_input

    if is_anndata(source):
        if not source.isbacked:
            return AnnDataReader(source, layer)
        source = source.filename
    path = Path(source)
    if not path.exists():
        raise UserError(f"input file {path} does not exist; the baseline reads the raw counts from it.")
    return open_input(path, layer=layer)


def _describe(source) -> str:
    if is_anndata(source):
        return str(source.filename) if source.isbacked else "the AnnData object"
    return str(source)


def _ids_and_columns(reader, with_columns: bool = True) -> tuple[list[str], dict[str, np.ndarray]]:
    """Cell ids and every obs column of one input, without reading the matrix where possible."""
    names = reader.obs_columns() if with_columns else []
    if hasattr(reader, "obs") and hasattr(reader.obs, "index"):  # h5ad: columns straight from obs
        ids = [str(x) for x in reader.obs.index(0, reader.n_rows)]
        cols = {c: np.asarray(reader.obs_column(c, 0, reader.n_rows), dtype=object) for c in names}
        return ids, cols
    ids, parts = [], {c: [] for c in names}
    step = reader.max_rows_per_read or CHUNK_ROWS
    for start in range(0, reader.n_rows, step):
        chunk = reader.read(start, min(start + step, reader.n_rows), names)
        ids.extend(str(x) for x in chunk.cell_ids)
        for c in names:
            parts[c].extend(list(chunk.obs[c]))
    return ids, {c: np.asarray(v, dtype=object) for c, v in parts.items()}


def table_from_file(source, layer: str | None = None) -> CellTable:
    """The cells of one input: a file any reader understands, or an AnnData object."""
    source = source if is_anndata(source) else Path(source)
    with _open(source, layer) as reader:
        ids, columns = _ids_and_columns(reader)
    n = len(ids)
    rows = np.stack([np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64)], axis=1)
    return CellTable(ids, columns, [source], rows, layer)


def table_from_shards(shard_dir: str | Path, adata: Any = ()) -> CellTable:
    """The cells of a shard directory, each linked to its row in the recorded input file.

    `adata`: the AnnData held in memory that the shards were tokenized from (or the list of
    them, in the order the tokenizer was given them): their counts have no file to be read from.
    """
    from cellrank_fm.shards import ShardSet

    shards = ShardSet(shard_dir)
    adata = [adata] if is_anndata(adata) else list(adata)
    held = dict(zip(in_memory_names(len(adata)), adata))
    cell_ids = [str(x) for x in shards.column("cell_id")]
    sources = [str(x) for x in shards.column("source")]
    meta = list(shards.manifest.get("metadata_columns", []))
    columns = {name: np.asarray(shards.column(name), dtype=object) for name in meta}
    layer = (shards.manifest.get("settings") or {}).get("layer")
    files: list[Path] = []
    rows = np.empty((len(cell_ids), 2), dtype=np.int64)
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    for source, idx in by_source.items():
        path = held[source] if source in held else _resolve_source(source, Path(shard_dir), shards.manifest)
        with _open(path, layer) as reader:
            names = _ids_and_columns(reader, with_columns=False)[0]
        # Repeated obs names are matched in order of occurrence, as the tokenizer wrote them.
        where: dict[str, list[int]] = {}
        for r, name in enumerate(names):
            where.setdefault(str(name), []).append(r)
        used: dict[str, int] = {}
        k = len(files)
        files.append(path)
        for i in idx:
            cid = cell_ids[i]
            hits = where.get(cid)
            j = used.get(cid, 0)
            if not hits or j >= len(hits):
                raise UserError(
                    f"cell {cid!r} of the shards is not in {_describe(path)}; the input changed since "
                    f"tokenizing — pass the input itself to the baseline instead."
                )
            used[cid] = j + 1
            rows[i] = (k, hits[j])
    return CellTable(cell_ids, columns, files, rows, layer, from_shards=True,
                     column_names=_tokenizer_genes(shards))


def _tokenizer_genes(shards) -> Callable:
    """Per-column gene IDs as the tokenizer resolved them (None for columns it did not use)."""
    from cellrank_fm.genes import GENE_MAP_FILE, GeneMapping
    from cellrank_fm.tokenize import Dictionaries, plan_for

    m = shards.manifest
    mapping = GeneMapping.from_table(shards.gene_map, str(shards.path / GENE_MAP_FILE)) if shards.gene_map else None
    gene_set = shards.gene_set
    dicts = Dictionaries(shards.vocabulary, shards.medians, mapping=mapping,
                         gene_set=set(gene_set) if gene_set is not None else None)
    gene_id_column = (m.get("settings") or {}).get("gene_id_column")

    def names(reader) -> list[str | None]:
        plan = plan_for(reader, dicts, gene_id_column)
        return [g if t >= 0 else None for g, t in zip(plan.gene_ids, plan.col_token)]

    return names


def _resolve_source(source: str, shard_dir: Path, manifest: dict) -> Path:
    candidates = [Path(source)]
    for rec in manifest.get("inputs", []):
        p = Path(str(rec.get("path", "")))
        if rec.get("in_memory") and p.name == source:
            raise UserError(
                "the shards were tokenized from an AnnData held in memory, so the baseline cannot read its "
                "counts back from a file; pass that AnnData too (adata= in cfm.baseline, baseline= in "
                "cfm.finetune), or write it to .h5ad and pass that file to the baseline."
            )
        if p.name == Path(source).name:
            candidates.append(p)
    candidates.append(shard_dir / source)
    for c in candidates:
        if c.exists():
            return c
    raise UserError(
        f"the input file {source} recorded in the shard manifest is gone; the baseline needs the "
        f"raw counts — restore it or pass the h5ad file directly."
    )


def load_table(data, adata: Any = ()) -> CellTable:
    """A shard directory (has manifest.json), an input any reader understands, or an AnnData."""
    from cellrank_fm.readers import is_directory_input

    if is_anndata(data):
        return table_from_file(data)
    path = Path(data)
    if path.is_dir() and not is_directory_input(path):
        return table_from_shards(path, adata)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a shard directory or an input file (.h5ad, ...).")
    return table_from_file(path)


def iter_normalised(table: CellTable, cells: np.ndarray) -> Iterator[tuple[np.ndarray, sp.csr_matrix, list[str]]]:
    """Yield (cell positions, counts/total×1e4 as CSR, the file's gene names) chunk by chunk.

    Totals are over all genes of the cell's input file. Only rows of `cells` are yielded.
    """
    cells = np.asarray(cells, dtype=np.int64)
    for k, path in enumerate(table.files):
        mine = cells[table.rows[cells, 0] == k]
        if len(mine) == 0:
            continue
        file_rows = table.rows[mine, 1]
        order = np.argsort(file_rows, kind="stable")
        mine, file_rows = mine[order], file_rows[order]
        with _open(path, table.layer) as reader:
            var_names = table.names_for(reader)
            step = reader.max_rows_per_read or CHUNK_ROWS
            for start in range(0, reader.n_rows, step):
                stop = min(start + step, reader.n_rows)
                lo, hi = np.searchsorted(file_rows, [start, stop])
                if lo == hi:
                    continue
                chunk = reader.read(start, stop)
                x = sp.csr_matrix((np.asarray(chunk.data, dtype=np.float64), chunk.indices,
                                   chunk.indptr - chunk.indptr[0]),
                                  shape=(chunk.n_rows, len(var_names)))[file_rows[lo:hi] - start]
                if x.nnz and (np.isnan(x.data).any() or x.data.min() < 0):
                    raise UserError(f"{_describe(path)} has negative or NaN counts; the baseline needs raw counts.")
                total = np.asarray(x.sum(axis=1)).ravel()
                scale = np.divide(1e4, total, out=np.zeros_like(total), where=total > 0)
                yield mine[lo:hi], sp.diags(scale) @ x, var_names


def highly_variable_genes(table: CellTable, train: np.ndarray, n_top_genes: int) -> list[str]:
    """Top genes by dispersion normalised within 20 mean bins (Seurat flavour), TRAIN cells only."""
    sums: dict[str, np.ndarray] = {}
    count = 0
    for _, x, var_names in iter_normalised(table, train):
        s1 = np.asarray(x.sum(axis=0)).ravel()
        s2 = np.asarray(x.multiply(x).sum(axis=0)).ravel()
        for name, a, b in zip(var_names, s1, s2):
            if name is None:
                continue
            acc = sums.setdefault(name, np.zeros(2))
            acc[0] += a
            acc[1] += b
        count += x.shape[0]
    names = list(sums)
    s = np.array([sums[g] for g in names])
    mean = s[:, 0] / count
    var = np.maximum(s[:, 1] / count - mean**2, 0) * count / max(count - 1, 1)
    expressed = mean > 0
    names = [g for g, e in zip(names, expressed) if e]
    mean, var = mean[expressed], var[expressed]
    disp = np.log(np.maximum(var / mean, 1e-12))
    bins = np.digitize(np.log1p(mean), np.linspace(np.log1p(mean).min(), np.log1p(mean).max(), 21)[1:-1])
    norm = np.zeros_like(disp)
    for b in np.unique(bins):
        m = bins == b
        sd = disp[m].std(ddof=1) if m.sum() > 1 else 0.0
        norm[m] = (disp[m] - disp[m].mean()) / sd if sd > 0 else 0.0
    order = np.lexsort((np.array(names), -norm))  # ties by gene name, for determinism
    return [names[i] for i in order[:n_top_genes]]


def gather_features(table: CellTable, cells: np.ndarray, genes: list[str]) -> sp.csr_matrix:
    """log1p(counts/total×1e4) of `genes` for `cells` (rows in `cells` order)."""
    gene_index = {g: j for j, g in enumerate(genes)}
    pos = {int(c): i for i, c in enumerate(cells)}
    blocks, where = [], []
    for idx, x, var_names in iter_normalised(table, cells):
        cols = np.array([gene_index.get(g, -1) for g in var_names])
        have = np.flatnonzero(cols >= 0)
        sub = x[:, have].tocoo()
        m = sp.csr_matrix((np.log1p(sub.data), (sub.row, cols[have][sub.col])),
                          shape=(x.shape[0], len(genes)))
        blocks.append(m)
        where.extend(pos[int(c)] for c in idx)
    out = sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, len(genes)))
    inv = np.empty(len(where), dtype=np.int64)
    inv[np.asarray(where, dtype=np.int64)] = np.arange(len(where))
    return out[inv]


def run_baseline(
    data: str | Path,
    label: str,
    *,
    split: Split | None = None,
    table: CellTable | None = None,
    n_top_genes: int = 2000,
    seed: int = 0,
    split_by: str | None = None,
    split_column: str | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_class_size: int = 10,
    class_weight: bool = True,
    c_grid=(0.01, 0.1, 1.0),
) -> dict:
    """Fit the baseline and return its test metrics (the metrics.json content).

    The regularisation strength is chosen on the validation split by macro-F1, the same
    criterion `finetune` uses for early stopping.
    """
    table = table or load_table(data)
    if split is None:
        split = split_cells(
            table.cell_ids, table.columns.__getitem__, table.columns, label=label,
            split_by=split_by, split_column=split_column, seed=seed,
            validation_fraction=validation_fraction, test_fraction=test_fraction,
            min_class_size=min_class_size, hint=SHARD_HINT if table.from_shards else "",
        )
    genes = highly_variable_genes(table, split.train, n_top_genes)
    feats = {name: gather_features(table, split.indices(name), genes) for name in ("train", "validation", "test")}
    result, chosen, best = fit_logistic(feats, split, seed=seed, class_weight=class_weight, c_grid=c_grid)
    result.update({
        "model": "logistic regression on log-normalised highly variable genes",
        "label_column": label,
        "genes": len(genes),
        "C": chosen,
        "validation_macro_f1": best if best >= 0 else None,
        "split": {"how": split.how, "seed": seed, "train": len(split.train),
                  "validation": len(split.validation), "test": len(split.test),
                  "dropped_classes": split.dropped},
        "messages": split.messages() + [split.summary()],
    })
    return result


def fit_logistic(feats: dict, split: Split, *, seed: int = 0, class_weight: bool = True,
                 c_grid=(0.01, 0.1, 1.0)) -> tuple[dict, float, float]:
    """Scaled logistic regression on per-split feature matrices; C chosen by validation macro-F1.

    Returns (test metrics, the chosen C, its validation macro-F1 or -1 without a validation split).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler(with_mean=False).fit(feats["train"])
    x = {name: scaler.transform(m) for name, m in feats.items()}
    y = {name: split.codes(name) for name in x}

    def fit(c):
        model = LogisticRegression(C=c, max_iter=2000, class_weight="balanced" if class_weight else None,
                                   random_state=seed)
        return model.fit(x["train"], y["train"])

    chosen, best = c_grid[0], -1.0
    if len(y["validation"]) and len(c_grid) > 1:
        for c in c_grid:
            f1 = classification_metrics(y["validation"], fit(c).predict(x["validation"]),
                                        split.classes)["macro_f1"]
            if f1 > best + 1e-12:
                chosen, best = c, f1
    model = fit(chosen)
    return classification_metrics(y["test"], model.predict(x["test"]), split.classes), chosen, best


def rank_features(tokens: list[np.ndarray], vocab_size: int, max_len: int) -> sp.csr_matrix:
    """Cells × vocabulary: each gene token weighted by ln(4 · max_len / rank), 0 where absent.

    Within a cell, expression falls roughly as a power of rank, so minus the log of the rank
    stands in for log expression; the offset keeps every kept gene at least ln 4 above an
    absent one, so presence itself carries weight and the rank refines it.
    """
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    rows = np.repeat(np.arange(len(tokens)), lengths)
    cols = np.concatenate(tokens).astype(np.int64) if len(tokens) else np.zeros(0, np.int64)
    ranks = np.arange(len(cols)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1
    vals = np.log(4 * max_len / ranks)
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(tokens), vocab_size))


def token_probe(shards, split: Split, *, seed: int = 0, class_weight: bool = True) -> dict:
    """Logistic regression on the model's own input: each cell's tokens weighted by rank.

    What a linear model reads from exactly the tokens the transformer sees (same cells, same
    truncation, same split), so the fine-tuned model should reach at least this figure: the
    information ceiling of the encoding for a linear reader.
    """
    special = [v for v in shards.special_tokens.values() if v is not None]
    max_len = int(shards.model_input_size or shards.lengths.max())
    feats = {}
    for name in ("train", "validation", "test"):
        toks = [t[~np.isin(t, special)] for t in shards.tokens(split.indices(name))]
        feats[name] = rank_features(toks, shards.vocab_size, max_len)
    used = np.flatnonzero(np.asarray(feats["train"].getnnz(axis=0)) > 0)
    feats = {name: m[:, used] for name, m in feats.items()}
    result, chosen, best = fit_logistic(feats, split, seed=seed, class_weight=class_weight)
    result.update({"model": "logistic regression on rank-weighted input tokens", "genes": int(len(used)),
                   "C": chosen, "validation_macro_f1": best if best >= 0 else None})
    return result
