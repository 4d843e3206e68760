"""The README's commands, run in order on the reference data: docs that cannot rot.

Every ```bash and ```python block of README.md runs, top to bottom, in one scratch directory
where the README's file names point at `../shared/data` (`pbmc.h5ad` is the Kang 2017 PBMCs,
`gf/` Geneformer's dictionaries, ...). To keep the run to minutes on a CPU, a few options are
rewritten (see FASTER; options and the Python API's keyword arguments alike): models become the
tiny preset, training runs a few steps, cells are cut to their top 64 genes, SHAP and
perturbation take a few cells. Nothing else is changed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# README name -> file under ../shared/data
FILES = {
    "gf": "geneformer",
    "pbmc.h5ad": "sc/kang2017_pbmc_ifnb_2k.h5ad",
    "new_cells.h5ad": "sc/kang2017_pbmc_ifnb_2k.h5ad",
    "tcells.h5ad": "sc/wu2020_tcells_200.h5ad",
    "lung_bulk.csv.gz": "bulk/gtex_lung_30samples_chr21.csv.gz",
    "Human.MitoCarta3.0.csv": "genes/Human.MitoCarta3.0.csv",
    "dosage_sens_tf_labels.csv": "genes/dosage_sens_tf_labels.csv",
}

FASTER = [
    (r"--preset geneformer-v\S+", "--preset tiny"),
    (r"--max-steps \d+", "--max-steps 4"),
    (r"--epochs \d+(\.\d+)?", "--epochs 1"),
    (r"--per-class \d+", "--per-class 2"),
    (r"--max-cells \d+", "--max-cells 6"),
    (r"--folds \d+", "--folds 2"),
    (r"--nproc_per_node \d+", "--nproc_per_node 2"),
    (r"(cellrank tokenize )", r"\1--model-input-size 64 "),
    # the same for the Python API's keyword arguments
    (r"per_class=\d+", "per_class=2"),
    (r"max_cells=\d+", "max_cells=6"),
    (r"epochs=\d+", "epochs=1"),
    (r"keep_obs=", "model_input_size=64, keep_obs="),
]


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every bash/python block, in README order."""
    text = README.read_text()
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(bash|python)\n(.*?)```", text, re.S)]


def faster(code: str) -> str:
    for pattern, repl in FASTER:
        code = re.sub(pattern, repl, code)
    return code


def test_ci_runs_the_readme_quick_start_commands():
    readme = README.read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for name in ("TEST_COMMAND", "DEMO_COMMAND"):
        command = re.search(rf"{name}='(.*)'", ci).group(1)
        assert f"```\n{command}\n```" in readme, name


def test_every_command_has_a_test_for_its_file_names():
    # A README command that names a file the harness does not provide would fail late; say so early.
    names = set(re.findall(r"\b[\w.]+\.(?:h5ad|csv\.gz|csv)\b", " ".join(code for _, code in readme_blocks())))
    produced = {n for n in names if re.search(rf"--out {re.escape(n)}", README.read_text())}
    assert names - produced <= set(FILES), sorted(names - produced - set(FILES))


def _hf_checkpoint(path: Path, vocab_size: int) -> None:
    """A small random HuggingFace BertForMaskedLM at the README's Geneformer checkpoint path."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=2048, hidden_act="relu")
    transformers.BertForMaskedLM(cfg).save_pretrained(path)


def test_readme_commands_run(shared_data, tmp_path):
    pytest.importorskip("transformers")
    work = tmp_path / "work"
    work.mkdir()
    for name, rel in FILES.items():
        (work / name).symlink_to(shared_data / rel)
    _hf_checkpoint(work / "Geneformer" / "gf-6L-30M-i2048", vocab_size=25426)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    assert shutil.which("cellrank", path=env["PATH"]), "the cellrank console script is not installed"
    script = ["set -euxo pipefail"]
    for lang, code in readme_blocks():
        code = faster(code)
        if lang == "python":
            script.append(f"{sys.executable} - <<'PYTHON'\n{code}PYTHON")
        else:
            script.append(code)
    (work / "readme.sh").write_text("\n".join(script) + "\n")
    run = subprocess.run(["bash", "readme.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=1500)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    # What the commands must have made, checked on their contents.
    import json

    import anndata as ad

    manifest = json.loads((work / "corpus" / "manifest.json").read_text())
    assert manifest["cells"]["written"] == sum(p["rows"] for p in manifest["parts"]) > 2000
    predicted = ad.read_h5ad(work / "pbmc.predicted.h5ad")
    assert predicted.n_obs == 2000 and "cellrank_label" in predicted.obs
    assert (work / "shap" / "gene_importance.csv").is_file()
    assert (work / "perturb" / "genes.csv").is_file()
    assert (work / "umap.png").stat().st_size > 1000
    # The Python API session: an in-memory AnnData tokenized, a classifier, SHAP files.
    assert json.loads((work / "pbmc_api_shards" / "manifest.json").read_text())["inputs"][0]["in_memory"]
    assert (work / "api_classifier" / "labels.json").is_file()
    assert json.loads((work / "api_classifier" / "metrics.json").read_text())["baseline"]["macro_f1"] > 0.5
    assert (work / "shap_api" / "gene_importance.csv").is_file()
