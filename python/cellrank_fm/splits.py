"""Train / validation / test splits shared by `finetune` and `baseline`.

A split is a function of the cells' ids, labels and the seed only — never of row order — so
the same cells land in the same split whether they are read from token shards or from the
original h5ad, and whichever command asks. Each cell gets a pseudo-random key from
(seed, cell id); within a class (or over groups) cells are ordered by that key and cut at the
requested fractions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from cellrank_fm.errors import UserError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation",
                  "val": "validation", "valid": "validation", "test": "test"}


@dataclass
class Split:
    """Row indices (into the caller's cells) of each split, and the classes that were kept."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    classes: list[str]
    labels: np.ndarray  # str label of every input row ("" where the label is missing)
    dropped: dict[str, int] = field(default_factory=dict)  # class -> cells left out (too rare)
    missing_labels: int = 0
    how: str = "stratified"

    def indices(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def codes(self, name: str) -> np.ndarray:
        """Class index (position in `classes`) of each cell of split `name`."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.array([lookup[x] for x in self.labels[self.indices(name)]], dtype=np.int64)

    def assignment(self) -> np.ndarray:
        """Split name per input row ("" for cells left out)."""
        out = np.full(len(self.labels), "", dtype=object)
        for name in SPLITS:
            out[self.indices(name)] = name
        return out

    def messages(self) -> list[str]:
        """What was left out, in sentences for the user."""
        msgs = []
        if self.missing_labels:
            msgs.append(f"{self.missing_labels:,} cells without a label were left out")
        if self.dropped:
            parts = ", ".join(f"{c} ({n})" for c, n in sorted(self.dropped.items()))
            msgs.append(f"classes below the minimum class size were left out: {parts}")
        return msgs

    def summary(self) -> str:
        return (f"split ({self.how}): {len(self.train):,} train, {len(self.validation):,} "
                f"validation, {len(self.test):,} test cells; {len(self.classes)} classes")


def cell_keys(cell_ids, seed: int) -> np.ndarray:
    """A uint64 per cell from (seed, cell id), independent of row order.

    Repeated ids (the same barcode in two input files) get distinct keys from their
    occurrence number, so every row still has its own place.
    """
    seen: dict[str, int] = {}
    keys = np.empty(len(cell_ids), dtype=np.uint64)
    salt = f"{int(seed)}\x00".encode()
    for i, cid in enumerate(cell_ids):
        cid = str(cid)
        k = seen.get(cid, 0)
        seen[cid] = k + 1
        digest = hashlib.blake2b(salt + cid.encode() + b"\x00%d" % k, digest_size=8).digest()
        keys[i] = int.from_bytes(digest, "little")
    return keys


def _clean_labels(labels) -> tuple[np.ndarray, np.ndarray]:
    """Labels as strings, and a mask of rows whose label is missing (None, NaN, empty)."""
    out = np.empty(len(labels), dtype=object)
    missing = np.zeros(len(labels), dtype=bool)
    for i, x in enumerate(labels):
        if x is None or (isinstance(x, float) and np.isnan(x)) or str(x) == "" or str(x) == "nan":
            missing[i] = True
            out[i] = ""
        else:
            out[i] = str(x)
    return out, missing


def _cut(count: int, fractions: tuple[float, float]) -> tuple[int, int]:
    """How many of `count` items go to validation and test (each at least 1 when count >= 3)."""
    val_frac, test_frac = fractions
    if count < 3:
        return 0, 0
    n_val = max(1, int(round(count * val_frac))) if val_frac > 0 else 0
    n_test = max(1, int(round(count * test_frac))) if test_frac > 0 else 0
    while n_val + n_test > count - 1:  # keep at least one training cell
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def make_split(
    cell_ids,
    labels,
    *,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_class_size: int = 10,
    groups=None,
    split_column=None,
) -> Split:
    """Split cells into train / validation / test.

    - default: stratified by label (each class cut at the fractions);
    - `groups` (e.g. donor per cell): whole groups go to one split, so no group straddles two;
    - `split_column`: the user's own assignment per cell (train / validation|val / test).
    Classes with fewer than `min_class_size` labelled cells are left out everywhere, and so are
    cells without a label; `Split.messages()` says what was left out.
    """
    n = len(cell_ids)
    if len(labels) != n:
        raise ValueError("cell_ids and labels differ in length")
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1
            and validation_fraction + test_fraction < 1):
        raise UserError("validation and test fractions must each be in [0, 1) and sum below 1.")
    lab, missing = _clean_labels(labels)
    classes_all, counts = np.unique(lab[~missing], return_counts=True)
    dropped = {str(c): int(k) for c, k in zip(classes_all, counts) if k < min_class_size}
    classes = [str(c) for c, k in zip(classes_all, counts) if k >= min_class_size]
    if len(classes) < 2:
        have = ", ".join(f"{c} ({k})" for c, k in zip(classes_all, counts)) or "none"
        raise UserError(
            f"need at least two classes with {min_class_size} or more labelled cells to train a "
            f"classifier, but the label column has: {have}; lower --min-class-size or pick "
            f"another label column."
        )
    keep = ~missing & np.isin(lab, classes)
    keys = cell_keys(cell_ids, seed)
    assign = np.full(n, -1, dtype=np.int8)  # 0 train, 1 validation, 2 test

    if split_column is not None:
        how = "from the split column"
        values, vmissing = _clean_labels(split_column)
        for i in np.flatnonzero(keep):
            name = _SPLIT_ALIASES.get(values[i].strip().lower()) if not vmissing[i] else None
            if name is None:
                raise UserError(
                    f"the split column has the value {values[i]!r} for cell {cell_ids[i]!r}; "
                    f"use train, validation (or val) and test."
                )
            assign[i] = SPLITS.index(name)
    elif groups is not None:
        how = "by group"
        gvals, gmissing = _clean_labels(groups)
        if np.any(gmissing & keep):
            raise UserError("some cells have no value in the grouping column; fill it in or "
                            "split another way.")
        gnames, ginv, gsizes = np.unique(gvals[keep], return_inverse=True, return_counts=True)
        if len(gnames) < 3:
            raise UserError(
                f"splitting by group needs at least 3 groups (one per split), but there are "
                f"{len(gnames)}: {', '.join(map(str, gnames))}."
            )
        gkeys = cell_keys([f"group:{g}" for g in gnames], seed)
        order = np.argsort(gkeys, kind="stable")
        # Walk groups in key order, placing each by the midpoint of its cumulative cell share.
        total = gsizes.sum()
        bounds = (1 - validation_fraction - test_fraction, 1 - test_fraction)
        gsplit = np.zeros(len(gnames), dtype=np.int8)
        cum = 0
        for g in order:
            mid = (cum + gsizes[g] / 2) / total
            gsplit[g] = 0 if mid < bounds[0] else (1 if mid < bounds[1] else 2)
            cum += gsizes[g]
        # Every split that was asked for gets at least one group.
        for want in (2, 1):
            frac = test_fraction if want == 2 else validation_fraction
            if frac > 0 and not np.any(gsplit == want):
                movable = [g for g in order[::-1] if gsplit[g] == 0]
                if len(movable) > 1:
                    gsplit[movable[0]] = want
        assign[keep] = gsplit[ginv]
    else:
        how = "stratified by label"
        for c in classes:
            rows = np.flatnonzero(keep & (lab == c))
            rows = rows[np.argsort(keys[rows], kind="stable")]
            n_val, n_test = _cut(len(rows), (validation_fraction, test_fraction))
            assign[rows] = 0
            assign[rows[:n_test]] = 2
            assign[rows[n_test:n_test + n_val]] = 1

    parts = [np.flatnonzero(assign == k) for k in range(3)]
    if len(parts[0]) == 0:
        raise UserError("the training split is empty; check the split column or fractions.")
    return Split(train=parts[0], validation=parts[1], test=parts[2], classes=classes,
                 labels=lab, dropped=dropped, missing_labels=int(missing.sum()), how=how)


SHARD_HINT = " (keep it when tokenizing: `cellrank tokenize ... --keep-obs {name}`)"


def require_column(name: str, available, what: str = "label column", hint: str = "") -> None:
    """UserError naming the available columns when `name` is not one of them.

    `hint` (may contain `{name}`) says how to get the column, e.g. `SHARD_HINT`.
    """
    available = list(available)
    if name not in available:
        shown = ", ".join(available) if available else "none"
        raise UserError(
            f"the {what} {name!r} is not in the data; available columns: {shown}"
            f"{hint.format(name=name)}."
        )


def split_cells(
    cell_ids,
    get_column,
    available,
    *,
    label: str,
    split_by: str | None = None,
    split_column: str | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_class_size: int = 10,
    hint: str = "",
) -> Split:
    """`make_split` over named columns of a table (token shards or an h5ad's obs).

    `get_column(name)` returns the values of column `name`; `available` lists the names.
    """
    if split_by and split_column:
        raise UserError("use either --split-by or --split-column, not both.")
    require_column(label, available, hint=hint)
    groups = splits = None
    if split_by:
        require_column(split_by, available, "grouping column", hint)
        groups = list(get_column(split_by))
    if split_column:
        require_column(split_column, available, "split column", hint)
        splits = list(get_column(split_column))
    return make_split(
        list(cell_ids), list(get_column(label)), seed=seed,
        validation_fraction=validation_fraction, test_fraction=test_fraction,
        min_class_size=min_class_size, groups=groups, split_column=splits,
    )
