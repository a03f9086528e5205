"""Range checks of the algorithms' settings (numpy numbers pass as Python ones, bools do not), each
error naming the setting and what it must be."""
from __future__ import annotations

import math
import numbers


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_finite(name: str, value, *, above: float = 0.0, inclusive: bool = False) -> None:
    """``value`` a finite real number > ``above`` (>= with ``inclusive``)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and \
        (value >= above if inclusive else value > above)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {above:g}, got {value!r}")
