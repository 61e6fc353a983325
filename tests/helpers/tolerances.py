"""Float tolerances that follow float32 arithmetic instead of bit-exact expectations.

A sum of ``n`` float32 terms carries a rounding error of up to about ``n · eps`` of the magnitude of
its terms (``eps = 2**-23``); a batched kernel (``bmm``) and a per-sample one (``mm``) add in
different orders, so their results may differ by that much and the difference changes with the
library version. The tolerances below are that bound times a headroom factor, and they stay far
below the error any real bug makes (named at each use).
"""

from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps
HEADROOM = 64


def float32_atol(magnitude: float, reduction_length: int, headroom: float = HEADROOM) -> float:
    """Absolute tolerance for float32 values of size ``magnitude`` computed through reductions of
    ``reduction_length`` terms."""
    return float(magnitude) * max(int(reduction_length), 1) * FLOAT32_EPS * headroom


def adam_delta_atol(lr: float, steps: int, reduction_length: int) -> float:
    """Tolerance for the weight change of ``steps`` Adam steps of size ``lr`` whose gradients are
    float32 reductions of ``reduction_length`` terms.

    Adam divides each gradient element by its own running RMS, so a rounding error in the gradient
    appears relative to ``lr`` in the step (and cancellation in a gradient element amplifies it):
    the bound scales with ``steps · lr``. A real bug (a missing or extra step, another sample's
    gradient, a wrong lr) moves elements by about ``lr``, which at ``reduction_length`` ≤ 1 000 is
    over 100× this tolerance.
    """
    return float32_atol(steps * lr, reduction_length)
