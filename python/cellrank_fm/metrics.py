"""Classification metrics in one JSON-ready shape, and the tables that print them."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true, y_pred, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    `y_true`, `y_pred` are class indices into `classes`. The confusion matrix has true classes
    in rows and predicted classes in columns, in `classes` order. Classes absent from the
    split get zero support and count toward macro-F1 only if they were predicted.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    labels = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    present = (support > 0) | np.isin(labels, y_pred)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "cells": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "classes": list(classes),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": cm.tolist(),
    }


def metrics_table(results: dict[str, dict], title: str = "test split"):
    """A rich Table: one column per model (e.g. cellrank, baseline), overall then per class."""
    from rich.table import Table

    names = list(results)
    table = Table(title=title)
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    first = results[names[0]]
    table.add_row("cells", *[f"{results[n]['cells']:,}" for n in names])
    table.add_row("accuracy", *[f"{results[n]['accuracy']:.3f}" for n in names])
    table.add_row("macro-F1", *[f"{results[n]['macro_f1']:.3f}" for n in names], end_section=True)
    for c in first["classes"]:
        row = []
        for n in names:
            pc = results[n]["per_class"].get(c)
            row.append(f"{pc['f1']:.3f}" if pc else "-")
        table.add_row(f"F1 {c} (n={first['per_class'][c]['support']})", *row)
    return table


def print_table(table) -> None:
    from rich.console import Console

    Console().print(table)
