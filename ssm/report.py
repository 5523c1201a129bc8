"""Results as tables and plots: a comparison's best rows, its results.csv / .md and
plots (ssm-compare), and for the benchmark scripts the machine a table was measured
on and a section of a markdown file replaced in place."""

import csv
import platform
import statistics
import sys
from pathlib import Path

import jax


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
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
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


def plot(rows, workdir):
  """The comparison's figures, in the workdir; returns their paths.

  accuracy.png: eval accuracy against model width per family, one panel per task
    length, the seeds' range as error bars (Zoology's Figure 2).
  loss.png: eval loss (bits per byte for byte-level text) against training FLOPs and
    against parameters (longest length).
  lengths.png, where the task is evaluated at other lengths: accuracy against the
    evaluation length per family, at the largest size (Mamba's Table 2).
  For image families accuracy.png is eval accuracy against parameters and against
    training FLOPs per image instead (matched families sit at one x per size)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  families = sorted({r["family"] for r in rows})
  lengths = sorted({r["seq_len"] for r in rows})
  paths = []
  if rows and "images_per_sec" in rows[0]:
    return plot_images(rows, workdir)

  fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), squeeze=False)
  for ax, seq_len in zip(axes[0], lengths):
    for family in families:
      rs = sorted((r for r in rows if r["family"] == family and r["seq_len"] == seq_len),
                  key=lambda r: r["d_model"])
      acc = [r["eval_accuracy"] for r in rs]
      err = [[a - r["eval_accuracy_min"] for a, r in zip(acc, rs)],
             [r["eval_accuracy_max"] - a for a, r in zip(acc, rs)]]
      ax.errorbar([r["d_model"] for r in rs], acc, yerr=err, fmt="o-", capsize=3, label=family)
    ax.set_xscale("log", base=2)
    widths = sorted({r["d_model"] for r in rows if r["seq_len"] == seq_len})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_xlabel("model width (d_model)")
    ax.set_title(f"sequence length {seq_len}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("eval accuracy")
  axes[0][0].legend()
  fig.tight_layout()
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
  fig.tight_layout()
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
    fig.tight_layout()
    paths.append(_save(fig, Path(workdir) / "lengths.png"))
  return paths


def plot_images(rows, workdir):
  """An image comparison's figures: accuracy.png and loss.png, eval accuracy (the
  seeds' range as error bars) and eval loss against parameters and against training
  FLOPs per image, one line per family (matched families share an x per size)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

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
    fig.tight_layout()
    paths.append(_save(fig, Path(workdir) / name))
  return paths


def _save(fig, path):
  import matplotlib.pyplot as plt
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
