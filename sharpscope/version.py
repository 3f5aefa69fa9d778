"""sharpscope's version: the one source that pyproject.toml, reports and ``--version`` read."""

__version__ = "0.1.0"
