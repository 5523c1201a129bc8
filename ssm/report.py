"""Results as tables and plots: a comparison's best rows, its results.csv / .md and
plots (ssm-compare), training curves from any run's metrics.jsonl (`ssm-plot`, no W&B
needed), and for the benchmark scripts the machine a table was measured on and a
section of a markdown file replaced in place."""

import argparse
import csv
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import jax
import numpy as np


def describe_device():
  device = jax.devices()[0]
  return (f"{device.platform} ({device.device_kind}, {platform.processor() or platform.machine()}, "
          f"{jax.local_device_count()} device(s))")


def attempt(fn, *args, **kwargs):
  """fn's row, or {"error": ...} when it fails (out of memory at a benchmark's largest
  sizes), so that the table still lands; compiled executables are dropped after each."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:
    print(f"{fn.__name__}: {str(e)[:300]}", file=sys.stderr)
    return dict(error="out of memory" if "RESOURCE_EXHAUSTED" in str(e) else type(e).__name__)
  finally:
    jax.clear_caches()


def write_section(path, name, body):
  """Replaces (or appends) the section between the markers of `name` in `path`."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  block = f"{begin}\n{body}{end}"
  if begin in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  path.write_text(text)


def best_rows(rows, metric="eval_loss", mode="min"):
  """Per (family, size, length): the learning rate with the best mean over seeds (among
  those run at the most seeds), with the seeds' spread (`_std`, `_min`, `_max` of loss
  and accuracy) beside the means."""
  groups = {}
  for r in rows:
    groups.setdefault((r["family"], r["size"], r["seq_len"], r["lr"]), []).append(r)
  best = {}
  for (family, size, seq_len, lr), rs in groups.items():
    row = dict(rs[0], seeds=len(rs))
    for k in ("eval_loss", "eval_accuracy", "tokens_per_sec", "steps", "tokens", "train_flops",
              "images_per_sec", "images"):
      if k in rs[0]:  # LMs count tokens, image models images
        row[k] = statistics.mean(r[k] for r in rs)
    for k in ("eval_loss", "eval_accuracy"):
      values = [r[k] for r in rs]
      row.update({f"{k}_std": statistics.pstdev(values), f"{k}_min": min(values),
                  f"{k}_max": max(values)})
    row["evals"] = {k: statistics.mean(r.get("evals", {}).get(k, float("nan")) for r in rs)
                    for k in rs[0].get("evals", {})}
    key = (family, size, seq_len)
    sign = 1 if mode == "min" else -1
    # a rate run at every seed beats one run at fewer (lr_sweep="first_seed")
    rank = lambda r: (-r["seeds"], sign * r[metric])
    if key not in best or rank(row) < rank(best[key]):
      best[key] = row
  return sorted(best.values(), key=lambda r: (r["size"], r["seq_len"], r["family"]))


COLUMNS = ["family", "d_model", "n_layer", "seq_len", "params", "train_flops_per_token", "lr",
           "seeds", "steps", "tokens", "eval_loss", "eval_accuracy", "eval_accuracy_std",
           "eval_accuracy_min", "tokens_per_sec"]
IMAGE_COLUMNS = ["family", "d_model", "n_layer", "registers", "params", "train_flops_per_image",
                 "lr", "seeds", "steps", "images", "eval_loss", "eval_accuracy",
                 "eval_accuracy_std", "eval_accuracy_min", "images_per_sec"]
# results.csv only (results.md stays readable): what the figures need to be redrawn from it
PLOT_COLUMNS = ["size", "eval_accuracy_max", "eval_loss_std", "eval_loss_min", "eval_loss_max",
                "train_flops"]


def write_tables(rows, workdir, paper=""):
  """results.csv and results.md; `paper` (the config's: what the paper reports for
  this comparison) is written under the table, so that the two are read together.
  Eval metrics beyond loss and accuracy (accuracy at other lengths, bits per byte)
  get columns of their own."""
  workdir = Path(workdir)
  extra = sorted({k for r in rows for k in r["evals"] if k not in ("loss", "accuracy")
                  and not k.startswith("loss@")}, key=_eval_order)
  rows = [dict(r, **{k: r["evals"].get(k, float("nan")) for k in extra}) for r in rows]
  columns = (IMAGE_COLUMNS if rows and "images_per_sec" in rows[0] else COLUMNS) + extra
  with (workdir / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, columns + PLOT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  fmt = {"params": "{:,}", "train_flops_per_token": "{:.3g}", "tokens": "{:,.0f}", "lr": "{:g}",
         "steps": "{:.0f}", "eval_loss": "{:.4f}", "eval_accuracy": "{:.4f}",
         "eval_accuracy_std": "{:.4f}", "eval_accuracy_min": "{:.4f}", "tokens_per_sec": "{:,.0f}",
         "train_flops_per_image": "{:.3g}", "images": "{:,.0f}", "images_per_sec": "{:,.0f}"}
  fmt.update({k: "{:.4f}" for k in extra})
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(fmt.get(k, "{}").format(r[k]) for k in columns) + " |")
  table = "\n".join(lines) + "\n"
  if paper:
    table += f"\nThe paper: {paper.strip()}\n"
  (workdir / "results.md").write_text(table)
  return table


def _eval_order(key):
  """accuracy@128 before accuracy@1024; other metrics after, by name."""
  name, _, length = key.partition("@")
  return (name, int(length) if length.isdigit() else -1)


def read_results(path):
  """A comparison's best rows back from its results.csv (write_tables), as plot takes
  them. Files written before results.csv carried `size` and the seeds' maxima: the size
  is then each family's rank by width (matched sizes keep their order), and the maximum
  accuracy 2 x mean - min, exact for one or two seeds (beyond, the mean: no upper bar)."""
  path = Path(path)
  with path.open(newline="") as f:
    raw = list(csv.DictReader(f))
  missing = sorted({"family", "d_model", "params", "seeds", "steps", "eval_loss", "eval_accuracy",
                    "eval_accuracy_min"} - set(raw[0] if raw else ()))
  if missing:
    raise ValueError(f"{path} holds no comparison rows (no {', '.join(missing)}): give the "
                     "results.csv ssm-compare wrote")
  known = set(COLUMNS) | set(IMAGE_COLUMNS) | set(PLOT_COLUMNS)
  rows = []
  for r in raw:
    row = {k: v if k == "family" else _number(v) for k, v in r.items()}
    row["evals"] = {k: row.pop(k) for k in list(row) if k not in known}
    row.setdefault("seq_len", 0)  # images
    row.setdefault("train_flops", row["train_flops_per_token"] * row["tokens"]
                   if "tokens" in row else row["train_flops_per_image"] * row["images"])
    mean = row["eval_accuracy"]
    row.setdefault("eval_accuracy_max", 2 * mean - row["eval_accuracy_min"]
                   if row["seeds"] <= 2 else mean)
    row.setdefault("eval_loss_min", row["eval_loss"])
    row.setdefault("eval_loss_max", row["eval_loss"])
    rows.append(row)
  if "size" not in raw[0]:
    for row in rows:
      row["size"] = sorted(r["d_model"] for r in rows if r["family"] == row["family"]
                           and r["seq_len"] == row["seq_len"]).index(row["d_model"])
  return rows


def _number(text):
  if text == "":
    return float("nan")
  try:
    return int(text)
  except ValueError:
    return float(text)


TASK_NAMES = {"mqar": "MQAR", "selective_copy": "selective copying",
              "induction_heads": "induction heads", "listops": "ListOps"}


def task_title(workdir):
  """The task of a run (its config.json) or of a comparison's runs (their request.json),
  e.g. "selective copying" or "images, fashion_mnist"; "" when the workdir has neither."""
  workdir = Path(workdir)
  found = [workdir / "config.json", *sorted(workdir.glob("runs/*/request.json"))]
  found = [p for p in found if p.is_file()]
  if not found:
    return ""
  config = json.loads(found[0].read_text())
  task = config.get("config", config).get("task", {})
  name = TASK_NAMES.get(task.get("name"), str(task.get("name", "")).replace("_", " "))
  source = task.get("dataset") or (Path(task["path"]).stem if task.get("path") else "")
  return f"{name}, {source}" if source else name


def plot(rows, workdir, title=None):
  """The comparison's figures, in the workdir; returns their paths.

  accuracy.png: eval accuracy against model width per family, one panel per task
    length, the seeds' range as error bars (Zoology's Figure 2); at a single size, a
    bar per family, with its parameters and the steps it trained.
  loss.png: eval loss (bits per byte for byte-level text) against training FLOPs and
    against parameters (longest length).
  lengths.png, where the task is evaluated at other lengths: accuracy against the
    evaluation length per family, at the largest size (Mamba's Table 2).
  For image families accuracy.png is eval accuracy against parameters and against
    training FLOPs per image instead (matched families sit at one x per size).
  curves.png, where the workdir holds the comparison's runs: the training curves of
    the rows' runs (every seed), from their metrics.jsonl (plot_curves).
  Every figure is titled with `title`, by default the task (task_title)."""
  workdir = Path(workdir)
  title = task_title(workdir) if title is None else title
  if rows and "images_per_sec" in rows[0]:
    paths = plot_images(rows, workdir, title)
  else:
    paths = _plot_lm(rows, workdir, title)
  runs = comparison_runs(workdir, rows)
  if runs:
    paths.append(plot_curves(runs, workdir / "curves.png", title))
  return paths


def _plot_lm(rows, workdir, title):
  plt = _pyplot()
  families = sorted({r["family"] for r in rows})
  lengths = sorted({r["seq_len"] for r in rows})
  paths = []
  fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), squeeze=False)
  for ax, seq_len in zip(axes[0], lengths):
    at = [r for r in rows if r["seq_len"] == seq_len]
    if len(at) == len({r["family"] for r in at}):  # one size: a bar per family
      _bars(ax, sorted(at, key=lambda r: r["family"]), families)
      ax.set_title(f"sequence length {seq_len}, width {_widths(at)}")
      ax.set_ylabel("eval accuracy")
      continue
    for family in families:
      rs = sorted((r for r in at if r["family"] == family), key=lambda r: r["d_model"])
      acc = [r["eval_accuracy"] for r in rs]
      err = [[a - r["eval_accuracy_min"] for a, r in zip(acc, rs)],
             [r["eval_accuracy_max"] - a for a, r in zip(acc, rs)]]
      ax.errorbar([r["d_model"] for r in rs], acc, yerr=err, fmt="o-", capsize=3, label=family,
                  color=f"C{families.index(family) % 10}")
    ax.set_xscale("log", base=2)
    widths = sorted({r["d_model"] for r in at})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_xlabel("model width (d_model)")
    ax.set_title(f"sequence length {seq_len}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_ylabel("eval accuracy")
    ax.legend(loc="center right")
  _finish(fig, title)
  paths.append(_save(fig, Path(workdir) / "accuracy.png"))

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  bpb = all("bits_per_byte" in r["evals"] for r in rows)  # byte-level LM: MambaByte's axis
  y = (lambda r: r["evals"]["bits_per_byte"]) if bpb else (lambda r: r["eval_loss"])
  for family in families:
    rs = sorted((r for r in rows if r["family"] == family and r["seq_len"] == lengths[-1]),
                key=lambda r: r["params"])
    axes[0].plot([r["train_flops"] for r in rs], [y(r) for r in rs], "o-", label=family)
    axes[1].plot([r["params"] for r in rs], [y(r) for r in rs], "o-", label=family)
  for ax, label, key in zip(axes, ("training FLOPs", "parameters"), ("train_flops", "params")):
    values = [r[key] for r in rows]
    if max(values) > 10 * min(values):  # a log axis only where sizes span a decade
      ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("eval bits per byte" if bpb else "eval loss")
    ax.grid(alpha=0.3)
  axes[0].legend()
  _finish(fig, title + (f" (sequence length {lengths[-1]})" if len(lengths) > 1 else ""))
  paths.append(_save(fig, Path(workdir) / "loss.png"))

  at_length = lambda r: {int(k.split("@")[1]): v for k, v in r["evals"].items()
                         if k.startswith("accuracy@")} | {r["seq_len"]: r["eval_accuracy"]}
  if any(len(at_length(r)) > 1 for r in rows):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    size = max(r["size"] for r in rows)
    for family in families:
      for r in (r for r in rows if r["family"] == family and r["size"] == size):
        points = sorted(at_length(r).items())
        ax.plot(*zip(*points), "o-", label=f"{family} (trained at {r['seq_len']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation sequence length")
    ax.set_ylabel("eval accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    _finish(fig, title)
    paths.append(_save(fig, Path(workdir) / "lengths.png"))
  return paths


def _widths(rows):
  widths = sorted({r["d_model"] for r in rows})
  return str(widths[0]) if len(widths) == 1 else "/".join(map(str, widths))


def _bars(ax, rows, families, metric="eval_accuracy"):
  """A bar per row (one size: one row per family) with the seeds' range, its value on
  it, and under it the family, its parameters and the steps it trained (fewer than
  asked where it stopped at its target)."""
  values = [r[metric] for r in rows]
  err = [[v - r[f"{metric}_min"] for v, r in zip(values, rows)],
         [r[f"{metric}_max"] - v for v, r in zip(values, rows)]]
  ax.bar(range(len(rows)), values, yerr=err if np.any(err) else None, capsize=3,
         color=[f"C{families.index(r['family']) % 10}" for r in rows])
  for i, v in enumerate(values):
    inside = v > 0.2
    ax.text(i, v - 0.03 if inside else v + 0.03, f"{v:.3f}", ha="center",
            va="top" if inside else "bottom", color="white" if inside else "black", fontsize=9)
  ax.set_xticks(range(len(rows)), [f"{r['family']}\n{r['params'] / 1e3:.0f}k params\n"
                                   f"{r['steps']:,.0f} steps" for r in rows], fontsize=8)
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3, axis="y")


def plot_images(rows, workdir, title=""):
  """An image comparison's figures: accuracy.png and loss.png, eval accuracy (the
  seeds' range as error bars) and eval loss against parameters and against training
  FLOPs per image, one line per family (matched families share an x per size)."""
  plt = _pyplot()
  paths = []
  for metric, label, name in (("eval_accuracy", "eval accuracy", "accuracy.png"),
                              ("eval_loss", "eval loss", "loss.png")):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for family in sorted({r["family"] for r in rows}):
      rs = sorted((r for r in rows if r["family"] == family), key=lambda r: r["params"])
      y = [r[metric] for r in rs]
      err = [[v - r[f"{metric}_min"] for v, r in zip(y, rs)],
             [r[f"{metric}_max"] - v for v, r in zip(y, rs)]]
      for ax, key in zip(axes, ("params", "train_flops_per_image")):
        ax.errorbar([r[key] for r in rs], y, yerr=err, fmt="o-", capsize=3, label=family)
    for ax, xlabel, key in zip(axes, ("parameters", "training FLOPs per image"),
                               ("params", "train_flops_per_image")):
      values = [r[key] for r in rows]
      if max(values) > 10 * min(values):
        ax.set_xscale("log")
      ax.set_xlabel(xlabel)
      ax.set_ylabel(label)
      ax.grid(alpha=0.3)
    axes[0].legend()
    _finish(fig, title)
    paths.append(_save(fig, Path(workdir) / name))
  return paths


# --- training curves ----------------------------------------------------------------

def read_metrics(run_dir):
  """A run's metrics.jsonl as {key: (steps, values)} in step order. A step written twice
  (a resumed run that redid it) counts once, as its last row; a line cut short by a
  kill is skipped, as are non-finite values."""
  path = Path(run_dir) / "metrics.jsonl"
  by_step = {}
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and "step" in row:
      by_step[row["step"]] = row
  if not by_step:
    raise ValueError(f"{path} has no rows yet: a run writes one every train.log_every steps")
  curves = {}
  for step in sorted(by_step):
    for key, value in by_step[step].items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        steps, values = curves.setdefault(key, ([], []))
        steps.append(step)
        values.append(value)
  return curves


def comparison_runs(workdir, rows=None):
  """[(label, family, curves)] of a comparison's finished runs: those of `rows` (the best
  learning rate per family, size and length; every seed), else all of them. Labels
  name the family and width (and the length where there are several)."""
  results = [(p.parent, json.loads(p.read_text()))
             for p in sorted(Path(workdir).glob("runs/*/result.json"))]
  key = lambda r: (r["family"], r["d_model"], r["n_layer"], r["seq_len"], r["lr"])
  if rows is not None:
    wanted = {key(r) for r in rows}
    results = [(d, r) for d, r in results if key(r) in wanted]
  lengths = {r["seq_len"] for _, r in results}
  results.sort(key=lambda dr: (dr[1]["family"], dr[1]["size"], dr[1]["seq_len"], dr[1]["seed"]))
  return [(f"{r['family']} d{r['d_model']}" + (f" len {r['seq_len']}" if len(lengths) > 1 else ""),
           r["family"], read_metrics(d)) for d, r in results]


CURVE_NAMES = {"loss": "train loss", "eval/loss": "eval loss",
               "eval/bits_per_byte": "eval bits per byte", "eval/accuracy": "eval accuracy",
               "accuracy": "train accuracy"}


def plot_curves(runs, path, title=""):
  """Training curves of runs [(label, family, curves)] (read_metrics) against the step:
  train loss, eval loss (bits per byte where measured) and eval accuracy (train
  accuracy where nothing was evaluated), a panel each where any run has it. A colour
  per family, a line style per label within it; a label's seeds share both."""
  plt = _pyplot()
  keys = {k for _, _, curves in runs for k in curves}
  panels = [k for k in ("loss", "eval/bits_per_byte" if "eval/bits_per_byte" in keys
                        else "eval/loss", "eval/accuracy" if "eval/accuracy" in keys
                        else "accuracy") if k in keys]
  if not panels:
    raise ValueError("the metrics have neither loss nor accuracy to plot")
  families = list(dict.fromkeys(family for _, family, _ in runs))
  within = {}  # family -> its labels, in order: the line styles
  for label, family, _ in runs:
    within.setdefault(family, [])
    if label not in within[family]:
      within[family].append(label)
  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
  for ax, key in zip(axes[0], panels):
    shown = set()
    for label, family, curves in runs:
      if key not in curves:
        continue
      steps, values = curves[key]
      ax.plot(steps, values, ("-", "--", ":", "-.")[within[family].index(label) % 4],
              color=f"C{families.index(family) % 10}", marker="o" if len(steps) <= 30 else None,
              ms=3, label=None if label in shown else label)
      shown.add(label)
    values = [v for _, _, curves in runs if key in curves for v in curves[key][1]]
    if "accuracy" in key:
      ax.set_ylim(-0.02, 1.02)
    elif min(values) > 0 and max(values) > 10 * min(values):
      ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(CURVE_NAMES[key])
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7)
  _finish(fig, title)
  return _save(fig, Path(path))


def plot_workdirs(workdirs, out=None, title=None):
  """What ssm-plot draws: the curves of every run given (an ssm-train workdir) and of
  every comparison's best runs (an ssm-compare workdir) in one figure, `out` (default
  WORKDIR/curves.png for one workdir, ./curves.png for several); and each comparison's
  figures redrawn from its results.csv (which is all a results folder in docs/ has)."""
  runs, paths = [], []
  prefix = lambda w: f"{w.name}: " if len(workdirs) > 1 else ""
  for w in map(Path, workdirs):
    if not w.is_dir():
      raise ValueError(f"{w}: no such directory; give ssm-train or ssm-compare workdirs")
    if (w / "metrics.jsonl").is_file():
      runs.append((w.name, str(w), read_metrics(w)))
    elif (w / "results.csv").is_file() or (w / "runs").is_dir():
      rows = read_results(w / "results.csv") if (w / "results.csv").is_file() else None
      name = task_title(w) if title is None else title
      if rows:
        paths += plot_images(rows, w, name) if "images_per_sec" in rows[0] else _plot_lm(
            rows, w, name)
      runs += [(prefix(w) + label, prefix(w) + family, curves)
               for label, family, curves in comparison_runs(w, rows)]
    else:
      raise ValueError(f"{w} has no metrics.jsonl (an ssm-train workdir), results.csv or runs/ "
                       "(an ssm-compare workdir): give one of those")
  if runs:
    if out is None:
      out = Path(workdirs[0]) / "curves.png" if len(workdirs) == 1 else Path("curves.png")
    one = title if title is not None else " / ".join(dict.fromkeys(
        t for t in map(task_title, workdirs) if t))
    paths.append(plot_curves(runs, out, one))
  elif out is not None:
    raise ValueError(f"--out {out}: no run with metrics.jsonl among {', '.join(workdirs)}")
  return paths


USAGE = """Training curves from metrics.jsonl, without W&B; a comparison's figures redrawn.

  ssm-plot runs/mqar-mamba                    # one run: runs/mqar-mamba/curves.png
  ssm-plot runs/mqar-mamba runs/mqar-attn --out mqar.png   # several runs in one figure
  ssm-plot runs/compare-mqar                  # a comparison: its best runs' curves
                                              # (curves.png) and accuracy/loss.png redrawn
  ssm-plot docs/results/compare-mqar --title MQAR   # results.csv alone: its figures

A WORKDIR is an ssm-train workdir (metrics.jsonl) or an ssm-compare workdir (runs/,
results.csv). Curves: train loss, eval loss (bits per byte for byte-level text), eval
accuracy against the step; a colour per family, a line style per size."""


def main(argv=None):
  parser = argparse.ArgumentParser(prog="ssm-plot", description=USAGE,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                      help="ssm-train or ssm-compare workdirs")
  parser.add_argument("--out", help="the curves' PNG (default: WORKDIR/curves.png for one "
                      "workdir, ./curves.png for several)")
  parser.add_argument("--title", help="the figures' title (default: the runs' task)")
  args = parser.parse_args(argv)
  try:
    paths = plot_workdirs(args.workdirs, args.out, args.title)
  except (ValueError, OSError) as e:
    print(f"ssm-plot: {e}", file=sys.stderr)
    return 2
  print("\n".join(map(str, paths)))
  return 0


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _finish(fig, title):
  if title:
    fig.suptitle(title)
  fig.tight_layout()


def _save(fig, path):
  import matplotlib.pyplot as plt
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


if __name__ == "__main__":
  sys.exit(main())
