"""The model zoo's registry; each architecture module registers its constructor at import."""

from qcbdefense.registry import Registry

MODELS: Registry = Registry("model")
