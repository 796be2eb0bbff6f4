"""Control probes of commercial panels (negative controls, blank and unassigned codewords).

They are kept out of cell-by-gene matrices and counted separately (the rate of control
probes inside cells vs on background is a false-positive QC).
"""

from __future__ import annotations

import re

import numpy as np

CONTROL_PATTERNS = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "BLANK_",
    "Blank-",
    "NegPrb",
    "FalseCode",
    "SystemControl",
    "antisense_",
)
_CONTROL_RE = re.compile("^(?:" + "|".join(re.escape(p) for p in CONTROL_PATTERNS) + ")")


def is_control_name(name: str) -> bool:
    """True if the gene name starts with one of :data:`CONTROL_PATTERNS` (case-sensitive)."""
    return bool(_CONTROL_RE.match(str(name)))


def control_mask(names: np.ndarray) -> np.ndarray:
    """Boolean (G,) mask of control-probe names among ``names`` (G,)."""
    return np.fromiter((is_control_name(n) for n in names), dtype=bool, count=len(names))
