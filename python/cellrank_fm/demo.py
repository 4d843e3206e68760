"""`cellrank demo`: the whole product on a simulated corpus, offline, in a few minutes on a CPU.

Each step is one call of the Python API (the functions the `cellrank` commands run, on the same
code path as a user's files) and leaves its outputs in the demo directory; the report then
gathers the figures and plots that matter:

    simulate -> medians -> tokenize -> pretrain -> finetune (+ baseline) -> explain -> perturb
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoSize:
    """How big the demo corpus and model runs are (the defaults finish in minutes on 2 cores)."""

    cells: int = 2000
    genes: int = 400
    genes_per_cell: int = 128
    pretrain_steps: int = 400
    finetune_epochs: float = 3.0
    explain_cells_per_class: int = 10
    perturb_cells: int = 80


QUICK = DemoSize(cells=600, genes=400, genes_per_cell=64, pretrain_steps=30, finetune_epochs=3.0,
                 explain_cells_per_class=2, perturb_cells=16)


class _Steps:
    """Runs API calls and logs each as the Python a user would type, with its wall time."""

    def __init__(self, out: Path, quiet: bool):
        self.out, self.quiet, self.log = out, quiet, []

    def run(self, name: str, *args, **kwargs):
        from cellrank_fm import api

        shown = ", ".join([self._show(a) for a in args] + [f"{k}={self._show(v)}" for k, v in kwargs.items()])
        call = f"cfm.{name}({shown})"
        print(f"\n>>> {call}", flush=True)
        started = time.perf_counter()
        result = getattr(api, name)(*args, progress=not self.quiet, **kwargs)
        self.log.append(f"{call}    # {time.perf_counter() - started:.0f} s")
        return result

    def _show(self, value) -> str:
        if isinstance(value, Path) or hasattr(value, "__fspath__"):
            path = Path(value)
            return repr(str(path.relative_to(self.out) if path.is_relative_to(self.out) else path))
        return repr(value)


def run_demo(out: str | Path, *, seed: int = 0, size: DemoSize = DemoSize(), quiet: bool = False,
             overwrite: bool = False) -> Path:
    """Run every step into `out` and write `out/report.md` and `out/report.html`; returns the report path.

    A failed demo leaves no directory behind (`cellrank_fm.outputs.claim`).
    """
    from cellrank_fm.outputs import check_new_directory, claim, remove

    with claim(out) as output:
        check_new_directory(out, overwrite)
        if overwrite and Path(out).is_dir():
            remove(Path(out))
            output.replaced()
        return _run_demo(Path(out), seed=seed, size=size, quiet=quiet)


def _run_demo(out: Path, *, seed: int, size: DemoSize, quiet: bool) -> Path:
    from rich.console import Console

    from cellrank_fm.metrics import metrics_table
    from cellrank_fm.simulate import planted, simulate_corpus
    from cellrank_fm.vocab import save_json_mapping

    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(out, quiet)
    console = Console(quiet=quiet)
    started = time.perf_counter()

    # 1. A corpus with known answers: three cell states with planted marker programs, and a
    #    disease condition with planted driver genes, in every state.
    adata, vocabulary, _ = simulate_corpus(n_cells=size.cells, n_genes=size.genes, seed=seed)
    truth = planted(adata)
    corpus = out / "corpus.h5ad"
    adata.write_h5ad(corpus)
    save_json_mapping(vocabulary, out / "vocabulary.json")
    print(f"simulated {adata.n_obs:,} cells x {adata.n_vars:,} genes -> {corpus}", flush=True)

    # 2-3. Medians from the corpus itself, then rank-value tokens through the Rust core.
    steps.run("medians", corpus, vocab=out / "vocabulary.json", out=out / "medians.json")
    shards = steps.run("tokenize", corpus, out=out / "shards", vocab=out / "vocabulary.json",
                       medians=out / "medians.json", model_input_size=size.genes_per_cell,
                       keep_obs=["cell_state", "condition", "donor"])

    # 4. Masked-gene pretraining of a tiny model.
    pretrained = steps.run("pretrain", shards, out=out / "pretrained", preset="tiny", max_steps=size.pretrain_steps,
                           tokens_per_batch=8192, lr=2e-3, seed=seed, device="cpu")

    # 5. Two classifiers from the pretrained model: cell state (explained) and condition
    #    (perturbed), each beside the logistic-regression baseline on the same split.
    classifiers = {}
    for label in ("cell_state", "condition"):
        clf = steps.run("finetune", shards, out=out / f"classifier_{label}", label=label, from_model=pretrained,
                        epochs=size.finetune_epochs, lr=2e-3, tokens_per_batch=2048, baseline=True, seed=seed,
                        device="cpu")
        classifiers[label] = clf
        console.print(metrics_table({"cellrank": clf.metrics, "baseline": clf.summary["baseline"]},
                                    title=f"{label}: test split"))

    # 6. Which genes decide each state (SHAP over the gene-deletion game).
    explained = steps.run("explain", classifiers["cell_state"], corpus, per_class=size.explain_cells_per_class,
                          label="cell_state", seed=seed, device="cpu")
    explained.write(out / "explain", top=15)
    console.print(explained.summary())

    # 7. Delete the planted drivers (as a set and one by one) from disease cells: do they move
    #    toward healthy cells?
    for mode, as_set in (("one_by_one", False), ("as_set", True)):
        perturbed = steps.run("perturb", classifiers["condition"], corpus, state_column="condition",
                              start_state="disease", goal_state="healthy", genes=truth["drivers"], as_set=as_set,
                              max_cells=size.perturb_cells, null_genes=30, seed=seed, device="cpu")
        perturbed.write(out / f"perturb_{mode}")
        console.print(perturbed.summary())

    seconds = time.perf_counter() - started
    report = write_report(out, truth, steps.log, seconds, seed)
    print(f"\nreport: {report}\n        {report.with_suffix('.html')}  ({seconds:.0f} s)", flush=True)
    return report


# ----------------------------------------------------------------------------- report


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _pretrain_rows(out: Path) -> list[list]:
    evals = [r for r in _read_jsonl(out / "pretrained" / "metrics.jsonl") if r.get("split") == "val"]
    if not evals:
        return []
    first, last = evals[0], evals[-1]
    names = {"loss": "validation loss", "accuracy": "masked-gene top-1 accuracy",
             "baseline_position_accuracy": "  frequency baseline (per rank position)",
             "baseline_overall_accuracy": "  frequency baseline (overall)"}
    return [[label, first.get(key), last.get(key)] for key, label in names.items() if key in last]


def _classifier_rows(out: Path, label: str) -> list[list]:
    m = _read_json(out / f"classifier_{label}" / "metrics.json")
    if not m:
        return []
    base = m.get("baseline", {})
    return [[label, "cellrank (fine-tuned)", m.get("accuracy"), m.get("macro_f1")],
            [label, "logistic regression (HVGs)", base.get("accuracy"), base.get("macro_f1")]]


def _explain_rows(out: Path, truth: dict, top: int = 10) -> list[list]:
    import pandas as pd

    path = out / "explain" / "gene_importance.parquet"
    if not path.is_file():
        return []
    imp = pd.read_parquet(path)
    rows = []
    for cls, markers in truth["markers"].items():
        part = imp[imp["class"] == cls].sort_values("mean_abs_shap", ascending=False).head(top)
        hits = int(part["gene_id"].isin(set(markers)).sum())
        symbols = ", ".join(part["gene_symbol"].fillna(part["gene_id"]).astype(str).head(5))
        rows.append([cls, f"{hits} / {len(part)}", symbols])
    return rows


def _perturb_rows(out: Path, truth: dict) -> list[list]:
    import pandas as pd

    rows = []
    drivers = set(truth["drivers"])
    for mode in ("as_set", "one_by_one"):
        path = out / f"perturb_{mode}" / "genes.parquet"
        if not path.is_file():
            continue
        genes = pd.read_parquet(path).sort_values("mean_shift_goal", ascending=False)
        for g in genes.itertuples():
            planted = set(str(g.gene_id).split("+")) <= drivers
            name = "all 10 drivers together" if mode == "as_set" else g.gene_symbol
            rows.append([name, "yes" if planted else "no", g.n_cells, f"{g.mean_shift_goal:+.2e}",
                         f"{g.null_mean_shift_goal:+.2e}", f"{g.fdr:.2g}"])
    return rows


def write_report(out: Path, truth: dict, log: list[str], seconds: float, seed: int) -> Path:
    """Gather the steps' figures and plots into report.md and report.html in `out`."""
    manifest = _read_json(out / "shards" / "manifest.json")
    cells = manifest.get("cells", {})
    md = ["# cellrank demo report", "",
          f"A simulated corpus (seed {seed}) with three cell states, each with {len(next(iter(truth['markers'].values())))} "
          f"planted marker genes, and a disease condition driven by {len(truth['drivers'])} planted genes. "
          f"Every step below is one call of cellrank's Python API (`import cellrank_fm as cfm`), the "
          f"functions the `cellrank` commands run; the whole run took {seconds:.0f} s.", ""]
    md += ["## Tokenization", ""]
    md += _table(["cells in", "filtered out", "empty", "written", "parts"],
                 [[cells.get("input"), cells.get("filtered_out"), cells.get("empty"), cells.get("written"),
                   len(manifest.get("parts", []))]])
    md += ["", "## Pretraining (masked-gene modelling)", ""]
    md += _table(["metric", "step 0", "end"], _pretrain_rows(out))
    md += ["", "## Cell-state classification, beside the baseline on the same test split", ""]
    md += _table(["label", "model", "accuracy", "macro-F1"],
                 _classifier_rows(out, "cell_state") + _classifier_rows(out, "condition"))
    md += ["", "![confusion matrix](classifier_cell_state/confusion_matrix.png)", ""]
    md += ["## Which genes decide each state (SHAP, permutation method)", "",
           "Top 10 genes by mean |SHAP| per state, and how many are the state's planted markers.", ""]
    md += _table(["state", "planted markers in top 10", "top genes"], _explain_rows(out, truth))
    for png in sorted((out / "explain").glob("*.png")):
        md += ["", f"![{png.stem}](explain/{png.name})"]
    md += ["", "## In silico deletion of the disease drivers", "",
           "Disease cells with the planted drivers deleted — all together, then one at a time: shift of "
           "their embedding toward healthy cells (cosine), against random expressed genes (or random sets "
           "of 10) deleted from the same cells as the null.", ""]
    md += _table(["gene", "planted driver", "cells", "mean shift toward healthy", "null mean shift", "FDR"],
                 _perturb_rows(out, truth))
    for png in sorted(out.glob("perturb_*/*.png")):
        md += ["", f"![{png.parent.name}]({png.parent.name}/{png.name})"]
    md += ["", "## Commands run", "", "```", *log, "```", ""]
    report = out / "report.md"
    report.write_text("\n".join(md))
    (out / "report.html").write_text(_markdown_to_html("\n".join(md)))
    return report


def _markdown_to_html(md: str) -> str:
    """Just enough Markdown (headings, tables, images, code) for the demo report."""
    body: list[str] = []
    in_code = in_table = False
    for line in md.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}" style="max-width:720px"></p>')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:4px 8px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>cellrank demo</title><style>{style}</style></head>" \
           f"<body>{''.join(body)}</body></html>\n"


__all__ = ["DemoSize", "QUICK", "run_demo", "write_report"]
