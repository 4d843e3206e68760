import numpy as np
import torch

from cellrank_fm.batching import IGNORE_INDEX, MaskingSpec, mask_genes, pack, token_budget_batches


def test_pack_layout():
    b = pack([np.array([5, 6, 7], dtype=np.uint16), np.array([9], dtype=np.uint16), np.array([3, 4])])
    assert b.input_ids.tolist() == [5, 6, 7, 9, 3, 4]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.max_seqlen == 3
    assert b.padded().tolist() == [[5, 6, 7], [9, 0, 0], [3, 4, 0]]
    assert b.key_mask.sum().item() == 6


def test_token_budget_batches_cover_every_cell_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=2000)
    batches = token_budget_batches(lengths, 1024, shuffle=True, seed=3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(2000))
    for b in batches:
        assert len(b) * lengths[b].max() <= 1024
    # Length-grouped: padded size stays close to the real token count.
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.15 * lengths.sum()
    again = token_budget_batches(lengths, 1024, shuffle=True, seed=3)
    assert all((a == b).all() for a, b in zip(batches, again))
    other = token_budget_batches(lengths, 1024, shuffle=True, seed=4)
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(batches, other))
    # A cell longer than the budget gets a batch of its own.
    assert [len(b) for b in token_budget_batches(np.array([5000, 2]), 1024, shuffle=False)] == [1, 1]


def test_masking_rates_and_special_tokens():
    spec = MaskingSpec(vocab_size=1000, mask_id=1, special_ids=(0, 1, 2, 3))
    rng = np.random.default_rng(0)
    cells = [np.concatenate([[2], rng.permutation(np.arange(4, 1000))[:500], [3]]) for _ in range(200)]
    flat = np.concatenate(cells)
    ids, labels = mask_genes(flat, spec, np.random.default_rng(7))
    selected = labels != IGNORE_INDEX
    is_special = np.isin(flat, [2, 3])
    assert not selected[is_special].any() and (ids[is_special] == flat[is_special]).all()
    assert (labels[selected] == flat[selected]).all()
    rate = selected.sum() / (~is_special).sum()
    assert abs(rate - 0.15) < 0.005
    masked = (ids == 1)[selected].mean()
    kept = (ids == flat)[selected].mean()
    changed = ((ids != 1) & (ids != flat))[selected].mean()
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(changed - 0.1) < 0.01
    assert ids[selected & (ids != 1)].min() >= 4  # random replacements are gene tokens
    assert (ids[~selected] == flat[~selected]).all()
    ids2, labels2 = mask_genes(flat, spec, np.random.default_rng(7))
    assert (ids2 == ids).all() and (labels2 == labels).all()
