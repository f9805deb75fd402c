"""qcbdefense: purify and detect quantization-conditioned backdoors.

The toolkit installs three top-level packages side by side: qcbdefense, models and export. A user's own
folder named models/ or export/ must not stand in for the last two (`python -m qcbdefense` puts the current
folder first on sys.path), so importing qcbdefense makes Python look those two names up beside this package
first, and refuses with one clear message when a foreign package of that name was imported before.
"""

import sys
from importlib.machinery import PathFinder
from pathlib import Path

__version__ = "0.1.0"

_ROOT = Path(__file__).resolve().parent.parent
_SIBLINGS = ("models", "export")


class _SiblingFinder:
    """A meta path finder that resolves `models` and `export` in this installation, ahead of sys.path."""

    root = _ROOT

    @staticmethod
    def find_spec(name, path=None, target=None):
        return PathFinder.find_spec(name, [str(_ROOT)]) if name in _SIBLINGS else None


def _claim_siblings() -> None:
    for name in _SIBLINGS:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if module is not None and (origin is None or Path(origin).resolve().parent.parent != _ROOT):
            where = origin or ", ".join(getattr(module, "__path__", [])) or "unknown"
            raise ImportError(f"qcbdefense needs its own top-level package '{name}' ({_ROOT / name}), but a "
                              f"'{name}' from {where} is already imported: import qcbdefense before it, or rename "
                              f"your package")
    if not any(getattr(finder, "root", None) == _ROOT for finder in sys.meta_path):
        sys.meta_path.insert(0, _SiblingFinder())


_claim_siblings()
