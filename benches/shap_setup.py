"""Set-up shared by the SHAP benches (`explain.py`, `pathways.py`): a classifier of a preset with
random weights (the cost of an evaluation does not depend on the weights), its `Evaluator`, and
coalitions sampled over one antithetic permutation of the gene game."""

from __future__ import annotations

import numpy as np


def random_classifier(preset: str, device: str = "cpu", seed: int = 0, vocabulary: dict | None = None,
                      tokens_per_batch: int = 65536):
    """(model, info, evaluator) for a 2-class `preset` classifier, seeded; with `vocabulary` the
    model reads that vocabulary (so gene sets resolve against it), otherwise the preset's size."""
    import torch

    from cellrank_fm.checkpoint import ModelDirInfo
    from cellrank_fm.explain import Evaluator
    from cellrank_fm.model import BertForSequenceClassification, preset_config

    torch.manual_seed(seed)
    size = {} if vocabulary is None else {"vocab_size": max(vocabulary.values()) + 1}
    cfg = preset_config(preset, **size, num_labels=2, pooling="mean", hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).to(device).eval()
    info = ModelDirInfo(path=None, config=cfg, architecture=model.architecture, labels=["a", "b"],
                        cellrank={"special_tokens": {"pad": 0, "mask": 1}}, vocabulary=vocabulary)
    return model, info, Evaluator(model, info, tokens_per_batch)


def permutation_coalitions(genes: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`n` of the 2·len(genes) + 1 coalitions of one antithetic permutation (genes added in a random
    order, then removed), evenly spread over it so their lengths are spread as in the real run."""
    from cellrank_fm.explain import coalition_sequences

    g = len(genes)
    order = rng.permutation(g)
    sizes = np.concatenate([np.arange(0, g + 1), np.arange(g - 1, -1, -1)])
    pick = np.linspace(1, len(sizes) - 2, n).round().astype(int)
    masks = np.zeros((len(pick), g), dtype=bool)
    for r, i in enumerate(pick):
        k = sizes[i]
        masks[r, order[:k] if i <= g else order[g - k:]] = True
    empty = np.array([], dtype=np.int64)
    return coalition_sequences(empty, genes, empty, masks)
