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


def test_the_scaling_comparison_trains_each_run_on_tokens_in_proportion_to_its_size():
  from ssm.compare import plan, run_config
  from ssm.config import load_config_file
  from ssm.flops import lm_flops, param_count
  cfg = load_config_file("configs/compare/scaling.py")
  runs = plan(cfg)
  assert len(runs) == 12 and {r.family for r in runs} == {"mamba", "mamba2", "transformer++"}
  for run in runs:
    c = run_config(cfg, run)
    rows = c.train.batch_size * c.task.seq_len  # tokens a step
    tokens = 20 * param_count(run.model, embeddings=False)
    assert c.train.steps == math.ceil(tokens / rows)
    assert c.train.eval_every == c.checkpoint.every == c.train.steps
    assert c.model.vocab_size == 1024  # the shipped tokenizer's
    ref = next(r for r in runs if r.family == "mamba" and r.size == run.size).model
    assert abs(lm_flops(run.model, 256)["total"] / lm_flops(ref, 256)["total"] - 1) <= 0.10


def test_a_comparison_across_sizes_writes_its_fits(tmp_path, monkeypatch):
  from ssm import compare
  from ssm.config import load_config_file
  flops = np.geomspace(1e12, 1e14, 3)
  data = [dict(r, size=i, seed=0, lr=1e-3, d_model=8, n_layer=1, params=1, tokens=1,
               train_flops_per_token=1, seq_len=128, eval_accuracy=0.5, steps=1,
               tokens_per_sec=1.0, evals={})
          for i, r in enumerate(rows("mamba", 9.0, 0.06, flops) + rows("transformer++", 7.0, 0.05, flops))]
  monkeypatch.setattr(compare, "execute", lambda cfg, workdir: data)
  cfg = load_config_file("configs/compare/scaling.py")
  workdir, table, figures = compare.compare(cfg, tmp_path)
  assert (tmp_path / "scaling.png") in figures and "cross at" in table
  assert (tmp_path / "scaling.md").read_text().startswith("| family | runs |")
