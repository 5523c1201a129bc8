"""Scaling laws from a comparison across sizes (configs/compare/scaling.py): each family's
eval loss against its training FLOPs, fitted by a power law L = a * C^-b (a straight
line in log-log, least squares), and where two families' fitted curves cross.

With tokens proportional to parameters (`tokens_per_param`, Chinchilla's ~20), a
family's runs trace its compute-optimal frontier only roughly: the ratio itself is
Chinchilla's fit for Transformers, not a measured optimum for each family here. What
the fits say is each family's loss at equal training compute along that recipe.
"""

import math

import numpy as np

from ssm.report import _pyplot, _save


def fit_power_law(flops, losses):
  """(a, b) of L = a * C^-b fitted to the points in log-log (at least two)."""
  x, y = np.log(np.asarray(flops, float)), np.log(np.asarray(losses, float))
  if len(x) < 2 or np.ptp(x) == 0:
    raise ValueError("a power law needs runs at two or more compute budgets")
  slope, intercept = np.polyfit(x, y, 1)
  return math.exp(intercept), -slope


def crossing(fit_1, fit_2):
  """The compute C at which two power laws are equal, or None if they are parallel."""
  (a1, b1), (a2, b2) = fit_1, fit_2
  if math.isclose(b1, b2, rel_tol=1e-9):
    return None
  return math.exp(math.log(a1 / a2) / (b1 - b2))


def fits(rows, metric="eval_loss"):
  """{family: dict(a, b, points, flops range)} from comparison result rows (one per run:
  its best learning rate, see ssm.report.best_rows)."""
  out = {}
  for family in dict.fromkeys(r["family"] for r in rows):
    rs = sorted((r for r in rows if r["family"] == family and math.isfinite(r[metric])),
                key=lambda r: r["train_flops"])
    if len(rs) < 2:
      continue
    a, b = fit_power_law([r["train_flops"] for r in rs], [r[metric] for r in rs])
    out[family] = dict(a=a, b=b, points=len(rs), min_flops=rs[0]["train_flops"],
                       max_flops=rs[-1]["train_flops"])
  return out


def summary(rows, metric="eval_loss"):
  """Markdown: each family's fit, and each pair's crossing (inside or outside the
  measured range)."""
  f = fits(rows, metric)
  lines = ["| family | runs | fit L = a·C^-b: a | b | FLOPs measured |", "|---|---|---|---|---|"]
  for family, p in f.items():
    lines.append(f"| {family} | {p['points']} | {p['a']:.4g} | {p['b']:.4f} | "
                 f"{p['min_flops']:.3g} – {p['max_flops']:.3g} |")
  names = list(f)
  crossings = []
  for i, x in enumerate(names):
    for y in names[i + 1:]:
      c = crossing((f[x]["a"], f[x]["b"]), (f[y]["a"], f[y]["b"]))
      lo = max(f[x]["min_flops"], f[y]["min_flops"])
      hi = min(f[x]["max_flops"], f[y]["max_flops"])
      if c is None:
        crossings.append(f"- {x} and {y}: parallel fits, no crossing")
        continue
      where = "inside" if lo <= c <= hi else "outside (an extrapolation)"
      steeper = x if f[x]["b"] > f[y]["b"] else y
      crossings.append(f"- {x} and {y} cross at {c:.3g} FLOPs, {where} the measured range "
                       f"({lo:.3g} – {hi:.3g}); {steeper} improves faster with compute")
  return "\n".join(lines + ["", *crossings])


def plot(rows, path, title="", metric="eval_loss"):
  """Eval loss against training FLOPs, log-log: each run a point, each family's fitted
  power law a line over its measured range (dashed beyond it, to the crossings)."""
  plt = _pyplot()
  f = fits(rows, metric)
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  all_flops = [r["train_flops"] for r in rows]
  span = np.geomspace(min(all_flops) / 1.5, max(all_flops) * 1.5, 100)
  for i, family in enumerate(dict.fromkeys(r["family"] for r in rows)):
    color = f"C{i}"
    rs = [r for r in rows if r["family"] == family]
    ax.plot([r["train_flops"] for r in rs], [r[metric] for r in rs], "o", color=color)
    if family in f:
      p = f[family]
      ax.plot(span, p["a"] * span ** -p["b"], "--", color=color, alpha=0.5, lw=1)
      inside = span[(span >= p["min_flops"]) & (span <= p["max_flops"])]
      ax.plot(inside, p["a"] * inside ** -p["b"], "-", color=color,
              label=f"{family}: L = {p['a']:.3g}·C^-{p['b']:.3f}")
    else:
      ax.plot([], [], "o", color=color, label=family)
  ax.set_xscale("log")
  ax.set_yscale("log")
  plain = plt.matplotlib.ticker.FormatStrFormatter("%.2f")  # losses span less than a decade
  ax.yaxis.set_major_formatter(plain)
  ax.yaxis.set_minor_formatter(plain)
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel(metric.replace("_", " ") + (" (nats per token)" if metric == "eval_loss" else ""))
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=10)
  return _save(fig, path)
