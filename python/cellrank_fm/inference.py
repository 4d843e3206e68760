"""Running a model directory on new cells: the one loader, the one batch runner, the input side.

Everything that applies a trained model goes through here — `predict`, `embed`, `explain`,
`perturb`, fine-tuning's evaluation and gene scoring:

- `load_model` reads a model directory with what tokenizing new cells needs (vocabulary,
  medians, gene set, gene map) and checks that the vocabulary belongs to the weights;
  `require_cell_classifier` is the one answer to "does this model classify cells?".
- `run_batches` is the one forward loop: cells sorted by length and cut into batches of at
  most `tokens_per_batch` padded tokens, packed, run without gradients, and on CUDA in
  bfloat16 autocast (which selects the variable-length flash attention path).
- New cells come as an AnnData (in memory or backed), an input file or a shard directory;
  they are tokenized in row chunks with the model's own dictionaries through the Rust core.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from cellrank_fm.errors import UserError, atomic_path
from cellrank_fm.tokenize import is_anndata

if TYPE_CHECKING:
    import anndata
    import pandas as pd
    import torch

    from cellrank_fm.batching import PackedBatch
    from cellrank_fm.checkpoint import ModelDirInfo

# Rows of an input tokenized at a time (the token arrays of a chunk are held in memory).
CHUNK_CELLS = 32768
# The most padded tokens in one batch on CPU, whatever budget is asked for: the budgets are
# sized for a GPU, and on CPU larger batches run slower per token (their activations outgrow
# the caches): 200 cells of 255 genes, geneformer-v1, one thread, took 12.2-14.2 s in batches
# of 65,536 tokens and 9.9-10.7 s in batches of 16,384 or 8,192 (benches/README.md, perturb).
CPU_TOKENS_PER_BATCH = 16384

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- the model


@dataclass
class LoadedModel:
    """A model directory loaded for inference, with what tokenizing new cells needs.

    `cellrank_fm.load_model` returns one; every API function also accepts the directory itself.
    """

    model: Any  # a cellrank_fm.model network, in eval mode, on its device
    info: ModelDirInfo
    vocabulary: dict[str, int]
    medians: dict[str, float]
    model_version: str
    model_input_size: int | None
    gene_set: list[str] | None
    gene_id_column: str | None
    mapping: Any | None  # genes.GeneMapping for symbols / aliases / retired IDs

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def labels(self) -> list[str]:
        """Class names in logit order (empty for a pretrained model)."""
        return [str(c) for c in (self.info.labels or [])]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        cfg = self.info.config
        kind = {"BertForMaskedLM": "pretrained model", "BertForSequenceClassification": "cell classifier",
                "BertForTokenClassification": "gene classifier"}.get(self.info.architecture, self.info.architecture)
        label_column = (self.info.cellrank or {}).get("label_column")
        classes = f" of {label_column!r}" if label_column else ""
        classes += f" ({', '.join(self.labels)})" if self.labels else ""
        return (f"<cellrank {kind}{classes}: {cfg.num_hidden_layers} layers x {cfg.hidden_size} hidden, "
                f"{len(self.vocabulary):,} tokens ({self.model_version}), on {self.device}, from {self.path}>")


def load_model(path: PathLike, *, device: str = "auto", gene_id_column: str | None = None,
               gene_map: Sequence[PathLike] = (), vocab: PathLike | dict | None = None,
               medians: PathLike | dict | None = None, compile: bool = False) -> LoadedModel:
    """Load a model directory (pretrained, fine-tuned, or a HuggingFace Geneformer checkpoint).

    Args:
        path: a directory written by `cellrank pretrain` / `cellrank finetune`, or a HuggingFace
            BERT directory (`config.json` + `model.safetensors` or `pytorch_model.bin`).
        device: "auto" (the GPU when there is one), "cpu", "cuda", "cuda:1", ...
        gene_id_column: var column of new inputs holding gene IDs (default: the one the model's
            shards were tokenized with, when an input has it, else var_names).
        gene_map: symbol/alias -> Ensembl ID tables (default: the mapping stored with the model).
        vocab, medians: the token dictionary and gene medians, for a checkpoint that carries
            none (Geneformer releases): paths (.pkl, .json, .parquet) or dictionaries.
        compile: `torch.compile` the encoder (`accel.compile_encoder`): faster on a GPU for
            large inputs, after a warm-up spent compiling.

    Example:
        >>> clf = cfm.load_model("classifier/")
        >>> clf.labels
        ['ctrl', 'stim']
    """
    from cellrank_fm.checkpoint import load_model_dir
    from cellrank_fm.genes import GENE_MAP_FILE, GeneMapping, load_mapping
    from cellrank_fm.outputs import REMAKE_MODEL, read_json
    from cellrank_fm.shards import GENE_SET_FILE
    from cellrank_fm.train import pick_device
    from cellrank_fm.vocab import load_medians, load_vocabulary

    path = Path(path)
    model, info = load_model_dir(path)
    if vocab is not None:
        info.vocabulary = dict(vocab) if isinstance(vocab, dict) else load_vocabulary(vocab)
    if medians is not None:
        info.medians = dict(medians) if isinstance(medians, dict) else load_medians(medians)
    if not info.vocabulary or not info.medians:
        raise UserError(
            f"{path} lacks vocabulary.json or medians.json, so new cells cannot be tokenized "
            f"as the model was trained; copy them from the shards the model was trained on."
        )
    check_model_vocabulary(path, info, info.vocabulary)
    ours = info.cellrank or {}
    version = ours.get("model_version") or ("v2" if "<cls>" in info.vocabulary else "v1")
    gene_set = read_json(path / GENE_SET_FILE, REMAKE_MODEL) if (path / GENE_SET_FILE).is_file() else None
    mapping = None
    if gene_map:
        mapping = load_mapping([str(p) for p in gene_map])
    elif info.gene_map:
        mapping = GeneMapping.from_table(info.gene_map, str(path / GENE_MAP_FILE))
    model.to(pick_device(device))
    model.eval()
    prepare(model, next(model.parameters()).device)
    if compile:
        from cellrank_fm.accel import compile_encoder

        compile_encoder(model)
    return LoadedModel(model, info, info.vocabulary, info.medians, version, ours.get("model_input_size"),
                       gene_set, gene_id_column or ours.get("gene_id_column"), mapping)


def check_model_vocabulary(model_dir: Path, info: ModelDirInfo, vocab: dict[str, int]) -> None:
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


def as_model(model: LoadedModel | PathLike, *, device: str = "auto", gene_id_column: str | None = None,
             gene_map: Sequence[PathLike] = (), compile: bool = False) -> LoadedModel:
    """`model` itself when already loaded (gene options applied to a copy; with `compile`, its
    encoder compiled in place), else `load_model(model)`."""
    if isinstance(model, LoadedModel):
        if compile:
            from cellrank_fm.accel import compile_encoder

            compile_encoder(model.model)
        if gene_id_column is None and not gene_map:
            return model
        from dataclasses import replace

        from cellrank_fm.genes import load_mapping

        return replace(model, gene_id_column=gene_id_column or model.gene_id_column,
                       mapping=load_mapping([str(p) for p in gene_map]) if gene_map else model.mapping)
    loaded = getattr(model, "loaded", None)  # a TrainedModel from cfm.finetune / cfm.pretrain
    if isinstance(loaded, LoadedModel):
        return as_model(loaded, gene_id_column=gene_id_column, gene_map=gene_map, compile=compile)
    return load_model(model, device=device, gene_id_column=gene_id_column, gene_map=gene_map, compile=compile)


def require_cell_classifier(model: LoadedModel | ModelDirInfo, *, pretrained_ok: bool = False) -> None:
    """UserError unless the model classifies cells (or, with `pretrained_ok`, is a pretrained encoder)."""
    info = model.info if isinstance(model, LoadedModel) else model
    arch = info.architecture
    if arch == "BertForSequenceClassification":
        if not info.labels:
            raise UserError(f"{info.path} has no labels.json, so its classes have no names; re-save it with `cellrank finetune`.")
        return
    if arch == "BertForMaskedLM" and pretrained_ok:
        return
    what = {
        "BertForMaskedLM": "a pretrained model without a classifier",
        "BertForTokenClassification": "a gene classifier (`finetune --task genes`; its scores for every gene "
                                      "are in gene_scores.csv beside it)",
    }.get(arch, f"a {arch}")
    wanted = "a cell classifier (`cellrank finetune --label COLUMN`)" + (" or a pretrained model" if pretrained_ok else "")
    raise UserError(f"{info.path} holds {what}, which has no cell classification head; give {wanted}.")


@dataclass
class TrainedModel:
    """What `cfm.finetune` and `cfm.pretrain` return: the model directory they wrote and the run's figures.

    It stands for the model anywhere one is expected (`cfm.predict(clf, adata)`); the weights are
    loaded on first use (`.loaded`).
    """

    path: Path
    summary: dict = field(default_factory=dict)
    device: str = "auto"

    def __fspath__(self) -> str:
        return str(self.path)

    @cached_property
    def loaded(self) -> LoadedModel:
        return load_model(self.path, device=self.device)

    @property
    def metrics(self) -> dict:
        """Test-split metrics (fine-tuning) or the run summary (pretraining)."""
        return self.summary.get("metrics", self.summary)

    def __repr__(self) -> str:
        m = self.metrics
        figures = ", ".join(f"{k} {m[k]:.3f}" for k in ("accuracy", "macro_f1", "roc_auc_mean") if isinstance(m.get(k), float))
        return f"<cellrank trained model in {self.path}{': ' + figures if figures else ''}>"


# ----------------------------------------------------------------------------- the batch runner


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA (the variable-length flash attention path), full precision
    elsewhere: `accel.resolve_precision`'s "auto"."""
    from cellrank_fm.accel import resolve_precision

    return resolve_precision(device).autocast()


def prepare(model, device: torch.device) -> None:
    """Backend flags and the attention path for inference, decided once (the capability check)."""
    from cellrank_fm.accel import choose_attention, configure_backends, resolve_precision

    precision = resolve_precision(device)
    configure_backends(precision)
    choose_attention(model, precision)


def run_batches(model, tokens: Sequence[np.ndarray], fn: Callable[[np.ndarray, PackedBatch], None], *,
                tokens_per_batch: int = 32768) -> None:
    """Call `fn(indices, batch)` for token-budget batches of the non-empty `tokens`, without gradients.

    Cells are sorted by length so the padded attention path on CPU wastes little; `indices` are
    the positions in `tokens` of the batch's cells. On CPU the budget is at most
    `CPU_TOKENS_PER_BATCH`.
    """
    import torch

    from cellrank_fm.batching import pack, token_budget_batches

    device = next(model.parameters()).device
    if device.type == "cpu":
        tokens_per_batch = min(tokens_per_batch, CPU_TOKENS_PER_BATCH)
    model.eval()
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    with torch.no_grad(), autocast(device):
        for idx in token_budget_batches(lengths, tokens_per_batch, shuffle=False):
            fn(idx, pack([tokens[i] for i in idx], device))


def per_cell(model, tokens: Sequence[np.ndarray], fn: Callable[[PackedBatch], torch.Tensor], width: int, *,
             tokens_per_batch: int = 32768, dtype=np.float32) -> np.ndarray:
    """`fn(batch)` ([cells, width] per batch) for every cell of `tokens`, in input order."""
    out = np.zeros((len(tokens), width), dtype=dtype)

    def keep(idx, batch):
        out[idx] = fn(batch).float().cpu().numpy()

    run_batches(model, tokens, keep, tokens_per_batch=tokens_per_batch)
    return out


def predict_tokens(model, tokens: Sequence[np.ndarray], tokens_per_batch: int = 32768) -> np.ndarray:
    """Class probabilities [cells, classes] (float32) for non-empty token arrays, in input order."""
    import torch

    return per_cell(model, tokens, lambda b: torch.softmax(model(b).float(), dim=-1), model.config.num_labels,
                    tokens_per_batch=tokens_per_batch)


def embed_tokens(model, tokens: Sequence[np.ndarray], *, layer: int = -1, pooling: str = "mean",
                 special_ids: Sequence[int] = (), tokens_per_batch: int = 32768,
                 gene_sums: dict | None = None) -> np.ndarray:
    """Pooled hidden states [cells, hidden] (float32) of `layer` for non-empty token arrays, in order.

    With `gene_sums` ({"sum": [vocab, hidden] float64, "count": [vocab] float64} tensors), each
    token's hidden state is also added to its gene's running sum.
    """
    import torch

    from cellrank_fm.model import pool

    out = np.zeros((len(tokens), model.config.hidden_size), dtype=np.float32)

    def keep(idx, batch):
        hidden = model.encode(batch, layer=layer).float()
        out[idx] = pool(hidden, batch, pooling, special_ids).cpu().numpy()
        if gene_sums is not None:
            ids = batch.input_ids.cpu()
            gene_sums["sum"].index_add_(0, ids, hidden.cpu().double())
            gene_sums["count"].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))

    run_batches(model, tokens, keep, tokens_per_batch=tokens_per_batch)
    return out


def gene_scores(model, tokens: Sequence[np.ndarray], genes: np.ndarray, tokens_per_batch: int = 32768) -> np.ndarray:
    """Mean class probabilities [len(genes), classes] of a gene classifier over every occurrence of each gene token."""
    import torch

    vocab = model.config.vocab_size
    sums = torch.zeros(vocab, model.config.num_labels, dtype=torch.float64)
    counts = torch.zeros(vocab, dtype=torch.float64)

    def add(idx, batch):
        ids = batch.input_ids.cpu()
        sums.index_add_(0, ids, torch.softmax(model(batch).float(), -1).cpu().double())
        counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))

    run_batches(model, tokens, add, tokens_per_batch=tokens_per_batch)
    g = torch.as_tensor(genes, dtype=torch.long)
    return (sums[g] / counts[g].clamp(min=1)[:, None]).numpy()


# ----------------------------------------------------------------------------- new cells


def open_h5ad(path: PathLike) -> anndata.AnnData:
    """An h5ad file opened backed (read-only): the matrix stays on disk and is read in chunks."""
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise UserError(f"input {path} does not exist.")
    if path.suffix != ".h5ad" or not path.is_file():
        raise UserError(f"{path} is not an .h5ad file; convert it to AnnData (h5ad) first"
                        f"{' (tiledbsoma.io.to_h5ad for a TileDB-SOMA experiment)' if path.is_dir() else ''}.")
    try:
        return ad.read_h5ad(path, backed="r")
    except Exception as err:  # noqa: BLE001 - any reading failure is the file's fault
        raise UserError(f"{path} could not be read as an h5ad file ({err}).") from None


def gene_id_column_for(lm: LoadedModel, var_columns) -> str | None:
    """The training input's gene-ID column when this input has it too, else None (var_names)."""
    column = lm.gene_id_column
    return column if column is not None and column in var_columns else None


def tokenized_chunks(adata: anndata.AnnData, lm: LoadedModel, chunk_cells: int = CHUNK_CELLS,
                     layer: str | None = None) -> Iterator[tuple[int, list[np.ndarray], np.ndarray]]:
    """(first row, tokens, ok) for each row chunk of an AnnData (in memory or backed), tokenized as
    the model expects; `ok[i]` is False for a cell without any vocabulary gene (empty tokens)."""
    from cellrank_fm.readers import FILE_ERRORS, unreadable
    from cellrank_fm.tokenize import tokenize_in_memory

    column = gene_id_column_for(lm, adata.var.columns)
    n = adata.n_obs
    for start in range(0, n, chunk_cells):
        stop = min(n, start + chunk_cells)
        part = adata[start:stop]
        if adata.isbacked:
            try:
                part = part.to_memory()
            except FILE_ERRORS as err:  # a damaged file fails inside anndata and h5py
                raise unreadable(adata.filename, err, f" at rows {start}-{stop}") from None
        res = tokenize_in_memory(
            part, lm.vocabulary, lm.medians, model_version=lm.model_version,
            model_input_size=lm.model_input_size, gene_id_column=column,
            mapping=lm.mapping, gene_set=lm.gene_set, layer=layer,
        )
        yield start, res.tokens, np.asarray(res.ok, dtype=bool)


@dataclass
class Cells:
    """Tokenized cells: token arrays, their ids and the input's per-cell metadata."""

    tokens: list[np.ndarray]
    cell_ids: list[str]
    obs: pd.DataFrame  # one row per cell, aligned with tokens

    def __len__(self) -> int:
        return len(self.tokens)


def load_cells(data, lm: LoadedModel, layer: str | None = None) -> Cells:
    """The cells of an AnnData (in memory or backed), an input file or a token shard directory,
    tokenized as the model was trained; cells without a vocabulary gene are left out."""
    import pandas as pd

    from cellrank_fm.shards import ShardSet

    if isinstance(data, ShardSet) or (not is_anndata(data) and Path(data).is_dir()):
        shards = data if isinstance(data, ShardSet) else ShardSet(data)
        if shards.vocabulary != lm.vocabulary:
            raise UserError(f"{shards.path} was tokenized with another vocabulary than the model's; tokenize it with the model's vocabulary.")
        names = ["cell_id"] + list(shards.manifest.get("metadata_columns") or [])
        obs = pd.DataFrame({n: shards.column(n) for n in names})
        cell_ids = [str(c) for c in obs["cell_id"]]
        return Cells(tokens=shards.tokens(), cell_ids=cell_ids, obs=obs.set_index(pd.Index(cell_ids)))
    from cellrank_fm.tokenize import tokenize_in_memory

    if is_anndata(data):
        # A backed AnnData is streamed from its file; its obs (perhaps edited in memory) is used.
        source, var = (str(data.filename) if data.isbacked else data), data.var
    else:
        path = Path(data)
        if not path.exists():
            raise UserError(f"input {path} does not exist.")
        source, var = str(path), _h5ad_var(path)
    # Formats without a var table (loom, tables) are read with the training input's ID column.
    column = lm.gene_id_column if var is None else gene_id_column_for(lm, var.columns)
    res = tokenize_in_memory(
        source, lm.vocabulary, lm.medians, model_version=lm.model_version, model_input_size=lm.model_input_size,
        gene_id_column=column, mapping=lm.mapping, gene_set=lm.gene_set, layer=layer,
    )
    keep = np.flatnonzero(res.ok)
    if len(keep) == 0:
        where = "the AnnData" if is_anndata(data) else str(data)
        raise UserError(f"no cell of {where} has a gene in the model's vocabulary.")
    obs = data.obs if is_anndata(data) else res.obs
    return Cells(tokens=[res.tokens[i] for i in keep], cell_ids=[str(res.cell_ids[i]) for i in keep],
                 obs=obs.iloc[keep])


def gene_symbols(data, lm: LoadedModel) -> dict[str, str]:
    """Gene ID -> symbol for display: the input's var symbols (an AnnData or .h5ad file with a
    symbol column), overridden by the model's own."""
    from cellrank_fm.shards import ShardSet

    var = None
    if is_anndata(data):
        var = data.var
    elif not isinstance(data, ShardSet):
        var = _h5ad_var(Path(data))
    return {**({} if var is None else var_symbols(var, lm.gene_id_column)), **(lm.info.symbols or {})}


def _h5ad_var(path: Path):
    """The var table of an h5ad file (None for other formats)."""
    if path.suffix != ".h5ad" or not path.is_file():  # also a shard directory
        return None
    adata = open_h5ad(path)
    try:
        return adata.var.copy()
    finally:
        adata.file.close()


def var_symbols(var: pd.DataFrame, gene_id_column: str | None = None) -> dict[str, str]:
    """Gene ID -> symbol from a var table with a symbol column beside the IDs, for display only."""
    from cellrank_fm.genes import normalise_id
    from cellrank_fm.tokenize import SYMBOL_COLUMNS

    ids = var[gene_id_column] if gene_id_column and gene_id_column in var else var.index.to_series()
    for col in SYMBOL_COLUMNS:
        if col in var.columns:
            pairs = ((normalise_id(str(i)), str(s)) for i, s in zip(ids, var[col]))
            return {i: s for i, s in pairs if i and s}
    return {}


def write_h5ad_copy(input_path: PathLike, out_path: PathLike, adata: anndata.AnnData, *,
                    obsm: Sequence[str] = (), uns: Sequence[str] = ()) -> None:
    """A copy of the h5ad file `input_path` with `adata`'s obs and the named obsm / uns entries.

    The matrix is copied as bytes, never loaded; the copy appears under `out_path` only when
    complete, and the input is never overwritten.
    """
    import h5py
    from anndata.io import write_elem

    input_path, out_path = Path(input_path), Path(out_path)
    if out_path.resolve() == input_path.resolve():
        raise UserError("--out must differ from the input file; cellrank never overwrites its input.")
    with atomic_path(out_path) as tmp:
        shutil.copyfile(input_path, tmp)
        with h5py.File(tmp, "r+") as f:
            del f["obs"]
            write_elem(f, "obs", adata.obs)
            for group, names, values in (("obsm", obsm, adata.obsm), ("uns", uns, adata.uns)):
                if group not in f:
                    f.create_group(group).attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
                for name in names:
                    if name in f[group]:
                        del f[group][name]
                    write_elem(f[group], name, values[name])
