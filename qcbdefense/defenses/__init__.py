"""Purifiers of quantization-conditioned backdoors: LAC (+PDA) and the baselines nearest, EFRAP, AdaRound.

`purify(model, data, method=..., spec=...)` returns the purified quantized model and a PurifyReport;
`save_purified` / `load_purified` store and rebuild it. Methods register in `DEFENSES` at import.
"""

from qcbdefense.defenses.base import (DEFENSES, Defense, PurifyReport, Score, load_purified, purify,
                                      read_report, save_purified)
from qcbdefense.defenses import adaround as _adaround  # noqa: F401  (each import registers its method)
from qcbdefense.defenses import efrap as _efrap  # noqa: F401
from qcbdefense.defenses import lac as _lac  # noqa: F401
from qcbdefense.defenses import nearest as _nearest  # noqa: F401

__all__ = ["DEFENSES", "Defense", "PurifyReport", "Score", "purify", "save_purified", "load_purified",
           "read_report"]
