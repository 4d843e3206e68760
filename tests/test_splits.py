import numpy as np
import pytest

from cellrank_fm.errors import UserError
from cellrank_fm.splits import make_split, split_cells


def _cells(n_per_class=(50, 30, 20), seed=1):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[f"c{k}"] * n for k, n in enumerate(n_per_class)])
    rng.shuffle(labels)
    ids = [f"cell{i:04d}" for i in range(len(labels))]
    return ids, labels


def _by_id(ids, split):
    return {name: {ids[i] for i in split.indices(name)} for name in ("train", "validation", "test")}


def test_stratified_fractions_per_class_and_disjoint():
    ids, labels = _cells()
    s = make_split(ids, labels, seed=3)
    sets = _by_id(ids, s)
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
    assert not (sets["validation"] & sets["test"])
    assert len(s.train) + len(s.validation) + len(s.test) == len(ids)
    for c, n in zip(("c0", "c1", "c2"), (50, 30, 20)):
        assert (labels[s.test] == c).sum() == round(n * 0.1)
        assert (labels[s.validation] == c).sum() == round(n * 0.1)
    assert s.classes == ["c0", "c1", "c2"]
    assert list(s.codes("test")) == [s.classes.index(x) for x in labels[s.test]]


def test_same_cells_whatever_the_row_order_or_subset_of_columns():
    ids, labels = _cells()
    a = make_split(ids, labels, seed=7)
    perm = np.random.default_rng(0).permutation(len(ids))
    b = make_split([ids[i] for i in perm], labels[perm], seed=7)
    assert _by_id(ids, a) == _by_id([ids[i] for i in perm], b)
    c = make_split(ids, labels, seed=8)
    assert _by_id(ids, a) != _by_id(ids, c)


def test_rare_classes_and_missing_labels_left_out_with_message():
    ids, labels = _cells((40, 40, 4))
    labels = labels.astype(object)
    labels[:3] = None
    s = make_split(ids, labels, seed=0, min_class_size=10)
    assert s.classes == ["c0", "c1"]
    assert "c2" in s.dropped
    kept = np.concatenate([s.train, s.validation, s.test])
    assert not set(labels[kept]) - {"c0", "c1"}
    msgs = " ".join(s.messages())
    assert "c2" in msgs and "3 cells without a label" in msgs


def test_group_split_keeps_each_group_in_one_split():
    rng = np.random.default_rng(2)
    n = 600
    ids = [f"b{i}" for i in range(n)]
    labels = rng.choice(["a", "b"], size=n)
    donors = rng.choice([f"donor{k}" for k in range(12)], size=n)
    s = make_split(ids, labels, groups=donors, seed=1)
    seen = {}
    for name in ("train", "validation", "test"):
        assert len(s.indices(name)) > 0
        for d in set(donors[s.indices(name)]):
            assert seen.setdefault(d, name) == name, f"{d} straddles two splits"
    assert len(s.train) > len(s.test)


def test_group_split_needs_three_groups():
    ids, labels = _cells()
    with pytest.raises(UserError, match="at least 3 groups"):
        make_split(ids, labels, groups=["x", "y"] * 50)


def test_explicit_split_column_and_bad_values():
    ids, labels = _cells()
    col = np.array(["train"] * 80 + ["val"] * 10 + ["Test"] * 10, dtype=object)
    s = make_split(ids, labels, split_column=col)
    assert list(s.validation) == list(range(80, 90)) and list(s.test) == list(range(90, 100))
    col[5] = "holdout"
    with pytest.raises(UserError, match="'holdout'"):
        make_split(ids, labels, split_column=col)


def test_split_cells_names_available_columns():
    ids, labels = _cells()
    cols = {"condition": labels}
    with pytest.raises(UserError, match="available columns: condition"):
        split_cells(ids, cols.__getitem__, cols, label="cell_type")
    with pytest.raises(UserError, match="at least two classes"):
        split_cells(ids, cols.__getitem__, cols, label="condition", min_class_size=60)
