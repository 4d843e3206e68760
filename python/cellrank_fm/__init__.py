"""cellrank: rank-value transcriptomic foundation models.

    import cellrank_fm as cfm

    shards = cfm.tokenize(adata, out="shards/", vocab=..., medians=..., keep_obs=["cell_type"])
    clf = cfm.finetune(shards, out="classifier/", label="cell_type", from_model="pretrained/")
    cfm.predict(clf, adata)                       # obs cellrank_label, obsm cellrank_proba
    res = cfm.explain(clf, adata, label="cell_type", per_class=50, method="gradient")

The functions live in `cellrank_fm.api` (see its docstring for the conventions) and are
imported on first use, so `import cellrank_fm` stays fast. Some share a name with the module
of their stage (`tokenize`, `predict`, `embed`, `explain`, `perturb`, `finetune`, `pretrain`,
`medians`, `baseline`, `score`): `cellrank_fm.predict` is always the function; import the module with
`from cellrank_fm.predict import ...`.
"""

import sys
import types

_API = ("tokenize", "tokenize_anndata", "medians", "load_model", "pretrain", "finetune", "baseline",
        "predict", "embed", "explain", "perturb", "score")
_ELSEWHERE = {"UserError": "cellrank_fm.errors"}

__all__ = [*_API, *_ELSEWHERE, "__version__"]


def __getattr__(name: str):
    if name == "__version__":  # importlib.metadata alone would double the import time
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("cellrank-fm")
        except PackageNotFoundError:  # running from a source tree
            value = "0.0.0+local"
        globals()[name] = value
        return value
    if name in _API or name in _ELSEWHERE:
        import importlib

        value = getattr(importlib.import_module(_ELSEWHERE.get(name, "cellrank_fm.api")), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cellrank_fm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing a stage module (`cellrank_fm.predict`) sets it as an attribute of the package;
    an API function of the same name must not be replaced by it."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
