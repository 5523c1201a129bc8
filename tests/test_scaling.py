"""Scaling-law fits (ssm.scaling): power laws recovered, crossings, the summary and plot."""

import math

import numpy as np
import pytest

from ssm import scaling


def rows(family, a, b, flops, noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  return [dict(family=family, train_flops=c, eval_loss=a * c ** -b * math.exp(noise * rng.normal()))
          for c in flops]


def test_a_power_law_is_recovered_and_two_cross_where_they_are_equal():
  flops = np.geomspace(1e12, 1e15, 4)
  a, b = scaling.fit_power_law(flops, [7.0 * c ** -0.05 for c in flops])
  assert math.isclose(a, 7.0, rel_tol=1e-9) and math.isclose(b, 0.05, rel_tol=1e-9)
  c = scaling.crossing((7.0, 0.05), (9.0, 0.06))
  assert math.isclose(7.0 * c ** -0.05, 9.0 * c ** -0.06, rel_tol=1e-9)
  assert scaling.crossing((7.0, 0.05), (8.0, 0.05)) is None
  with pytest.raises(ValueError, match="two or more"):
    scaling.fit_power_law([1e12], [3.0])


def test_summary_says_where_fitted_curves_cross_and_whether_it_was_measured(tmp_path):
  flops = np.geomspace(1e12, 1e15, 4)
  # mamba: 9 C^-0.06, transformer: 7 C^-0.05: equal at C = (9/7)^(1/0.01)
  data = rows("mamba", 9.0, 0.06, flops, noise=1e-3) + rows("transformer++", 7.0, 0.05, flops)
  fit = scaling.fits(data)
  assert math.isclose(fit["mamba"]["b"], 0.06, rel_tol=0.05) and fit["mamba"]["points"] == 4
  text = scaling.summary(data)
  where = scaling.crossing(*[(fit[f]["a"], fit[f]["b"]) for f in ("mamba", "transformer++")])
  assert math.isclose(where, (9.0 / 7.0) ** (1 / 0.01), rel_tol=0.5)  # ~8e10, below 1e12
  assert f"cross at {where:.3g} FLOPs" in text
  assert "outside (an extrapolation)" in text and "mamba improves faster" in text
  single = scaling.summary(data + [dict(family="hybrid", train_flops=1e13, eval_loss=2.0)])
  assert "hybrid" not in single  # one run is no fit
  scaling.plot(data, tmp_path / "scaling.png", title="test")
  assert (tmp_path / "scaling.png").stat().st_size > 10_000
