"""cellrank: rank-value transcriptomic foundation models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cellrank-fm")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"
