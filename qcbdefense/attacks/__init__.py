"""Quantization-conditioned backdoor attacks: Qu-ANTI-zation, CompArtifact, PQBackdoor.

`attack(model, data, method=..., bits=..., spec=...)` returns the float model an attacker would publish and
an AttackReport (FP CA/ASR, CA/ASR after the victim's round-to-nearest PTQ at each targeted bit width, and
the transfer to other quantizers, and whether the backdoor planted by `PlantCriteria`). Methods register in
`ATTACKS` at import.
"""

from qcbdefense.attacks.base import (ATTACKS, Attack, AttackConfig, AttackReport, PlantCriteria, attack,
                                     make_config, parse_bits, read_report, spec_at)
from qcbdefense.attacks import compartifact as _compartifact  # noqa: F401  (each import registers its method)
from qcbdefense.attacks import pqbackdoor as _pqbackdoor  # noqa: F401
from qcbdefense.attacks import quanti as _quanti  # noqa: F401

__all__ = ["ATTACKS", "Attack", "AttackConfig", "AttackReport", "PlantCriteria", "attack", "make_config",
           "parse_bits", "read_report", "spec_at"]
