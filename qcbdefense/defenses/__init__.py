"""Purifiers of quantization-conditioned backdoors: LAC (+PDA) and the baselines nearest, EFRAP, AdaRound; the
FP-model defences of the LAC paper's tables (FT, fine-pruning, NAD, I-BAU, FT-SAM) and the robust-quantization
baselines of EFRAP's (OMSE, ACIQ).

`purify(model, data, method=..., spec=...)` returns the purified quantized model and a PurifyReport;
`save_purified` / `load_purified` store and rebuild it. Methods register in `DEFENSES` at import.
"""

from qcbdefense.defenses.base import (DEFENSES, Defense, PurifyReport, Score, load_purified, purify,
                                      read_report, save_purified)
from qcbdefense.defenses import aciq as _aciq  # noqa: F401  (each import registers its method)
from qcbdefense.defenses import adaround as _adaround  # noqa: F401
from qcbdefense.defenses import efrap as _efrap  # noqa: F401
from qcbdefense.defenses import fine_pruning as _fine_pruning  # noqa: F401
from qcbdefense.defenses import ft as _ft  # noqa: F401
from qcbdefense.defenses import ft_sam as _ft_sam  # noqa: F401
from qcbdefense.defenses import ibau as _ibau  # noqa: F401
from qcbdefense.defenses import lac as _lac  # noqa: F401
from qcbdefense.defenses import nad as _nad  # noqa: F401
from qcbdefense.defenses import nearest as _nearest  # noqa: F401
from qcbdefense.defenses import omse as _omse  # noqa: F401

__all__ = ["DEFENSES", "Defense", "PurifyReport", "Score", "purify", "save_purified", "load_purified",
           "read_report"]
