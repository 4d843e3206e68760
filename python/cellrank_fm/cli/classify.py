"""Commands: placeholder until this group lands."""
from cellrank_fm.cli.app import app  # noqa: F401
