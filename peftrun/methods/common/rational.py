"""A learnable rational activation, the "safe" Padé unit (Molina et al., 2020) that IAPT uses:

    R(x) = (a_0 + a_1 x + ... + a_m x^m) / (1 + |b_1 x + ... + b_n x^n|)

The denominator is at least 1, so R has no poles whatever the coefficients become in training.
Initial coefficients are least-squares fits to GELU / ReLU / SiLU made by
scripts/fit_rational.py and shipped in rational_init.json (package data).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

INIT_FILE = Path(__file__).with_name("rational_init.json")


@functools.lru_cache(maxsize=1)
def _fits() -> dict:
    return json.loads(INIT_FILE.read_text())


def degree_key(m: int, n: int) -> str:
    return f"{m}/{n}"


def available_inits() -> dict[str, list[str]]:
    """{"gelu": ["6/5", ...], ...}: the (function, degrees) pairs rational_init.json holds."""
    return {fn: sorted(entry) for fn, entry in _fits()["fits"].items()}


def init_coefficients(init: str, m: int, n: int) -> tuple[list[float], list[float]]:
    """(numerator a_0..a_m, denominator b_1..b_n) fitted to `init`; KeyError if not shipped."""
    fit = _fits()["fits"][init][degree_key(m, n)]
    return fit["numerator"], fit["denominator"]


def rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """R(x) elementwise; numerator holds a_0..a_m, denominator b_1..b_n (Horner's rule)."""
    p = torch.zeros_like(x) + numerator[-1]
    for a in numerator.flip(0)[1:]:
        p = p * x + a
    q = torch.zeros_like(x) + denominator[-1]
    for b in denominator.flip(0)[1:]:
        q = q * x + b
    q = q * x  # the denominator polynomial has no constant term: b_1 x + ... + b_n x^n
    return p / (1.0 + q.abs())


class Rational(nn.Module):
    """A rational activation with learnable coefficients (float32, whatever the input dtype)."""

    def __init__(self, m: int = 6, n: int = 5, init: str = "gelu", device=None):
        super().__init__()
        a, b = init_coefficients(init, m, n)
        self.numerator = nn.Parameter(torch.tensor(a, dtype=torch.float32, device=device))
        self.denominator = nn.Parameter(torch.tensor(b, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x.float(), self.numerator, self.denominator).to(x.dtype)

    def extra_repr(self) -> str:
        return f"m={self.numerator.numel() - 1}, n={self.denominator.numel()}"
