"""The safe Padé activation and its shipped initial fits (scripts/fit_rational.py)."""

from __future__ import annotations

import tomllib

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from peftrun.methods.common.rational import Rational, available_inits, init_coefficients, rational

TARGETS = {"gelu": F.gelu, "relu": torch.relu, "silu": F.silu}


@pytest.mark.parametrize(
    "fn, degrees, bound",
    [("gelu", (6, 5), 1e-4), ("silu", (6, 5), 1e-6), ("relu", (6, 5), 2.5e-2), ("gelu", (5, 4), 1e-3)],
)
def test_fit_largest_error_on_minus3_3(fn, degrees, bound):
    a, b = init_coefficients(fn, *degrees)
    x = torch.linspace(-3, 3, 6001, dtype=torch.float64)
    y = rational(x, torch.tensor(a, dtype=x.dtype), torch.tensor(b, dtype=x.dtype))
    assert (y - TARGETS[fn](x)).abs().max() < bound


def test_default_unit_is_gelu_in_float32_and_trains():
    unit = Rational()  # (6, 5), GELU
    assert unit.numerator.numel() == 7 and unit.denominator.numel() == 5
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    y = unit(x)
    torch.testing.assert_close(y, F.gelu(x), atol=2e-4, rtol=0)
    y.sum().backward()
    assert unit.numerator.grad.abs().sum() > 0 and unit.denominator.grad.abs().sum() > 0


def test_no_poles_whatever_the_coefficients():
    # The "safe" denominator is 1 + |Q(x)| >= 1: bounded numerator, bounded output.
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, generator=generator) * 10, torch.randn(5, generator=generator) * 10
    x = torch.linspace(-2, 2, 10001)
    y = rational(x, a, b)
    assert torch.isfinite(y).all()
    assert (y.abs() <= rational(x.abs(), a.abs(), torch.zeros(5)) + 1e-3).all()


def test_every_function_ships_the_default_degrees_as_package_data():
    assert all("6/5" in degrees for degrees in available_inits().values())
    assert set(available_inits()) == set(TARGETS)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "rational_init.json" in pyproject["tool"]["setuptools"]["package-data"]["peftrun.methods.common"]
