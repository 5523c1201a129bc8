"""ssm.report's figures: training curves from metrics.jsonl (ssm-plot, and ssm-compare's
curves.png of its best runs), a comparison's figures redrawn from its results.csv, a bar
per family at a single size, every figure titled with its task. Figures are checked by
what is drawn on them (the Figure objects, caught before saving), not by file sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssm import report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def figures(monkeypatch):
  """{file name: Figure} of every figure report saves (still written to disk)."""
  caught, save = {}, report._save

  def keep(fig, path):
    caught[Path(path).name] = fig
    return save(fig, path)

  monkeypatch.setattr(report, "_save", keep)
  return caught


def write_run(run_dir, rows, task=None):
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  if task is not None:
    (run_dir / "config.json").write_text(json.dumps({"task": task}))


def lines_of(ax):
  return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
          for line in ax.get_lines()}


def test_curves_of_runs_from_metrics_jsonl(tmp_path, figures, capsys):
  """Two runs' metrics.jsonl in one figure: a panel per metric, each run's values at
  its steps; a step written twice (a resumed run) counts once as its last row, a line
  cut short by a kill is skipped; titled with the runs' task."""
  a, b = tmp_path / "mamba", tmp_path / "attn"
  write_run(a, [{"step": 10, "loss": 2.5, "lr": 1e-3},
                {"step": 20, "loss": 2.0, "eval/loss": 2.1, "eval/accuracy": 0.25},
                {"step": 20, "loss": 1.9, "eval/loss": 2.0, "eval/accuracy": 0.5}],
            task={"name": "selective_copy", "seq_len": 64})
  (a / "metrics.jsonl").write_text((a / "metrics.jsonl").read_text() + '{"step": 30, "lo')
  write_run(b, [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 0.2, "eval/loss": 0.1,
                                             "eval/accuracy": 0.9}])
  out = tmp_path / "both.png"
  assert report.main([str(a), str(b), "--out", str(out)]) == 0
  assert capsys.readouterr().out.split() == [str(out)] and out.stat().st_size > 0
  fig = figures["both.png"]
  assert fig._suptitle.get_text() == "selective copying"
  loss, eval_loss, accuracy = fig.axes
  assert [ax.get_title() for ax in fig.axes] == ["train loss", "eval loss", "eval accuracy"]
  assert lines_of(loss) == {"mamba": ([10, 20], [2.5, 1.9]), "attn": ([10, 20], [3.0, 0.2])}
  assert lines_of(eval_loss) == {"mamba": ([20], [2.0]), "attn": ([20], [0.1])}
  assert lines_of(accuracy) == {"mamba": ([20], [0.5]), "attn": ([20], [0.9])}
  assert loss.get_yscale() == "log" and accuracy.get_ylim() == (-0.02, 1.02)
  # one workdir: its own curves.png
  assert report.main([str(b)]) == 0
  assert (b / "curves.png").stat().st_size > 0 and figures["curves.png"]._suptitle is None


def test_bad_workdirs_are_one_line_and_exit_2(tmp_path):
  """Through the command: a missing directory, one that is no workdir, a run that has
  not logged yet."""
  (tmp_path / "empty").mkdir()
  write_run(tmp_path / "new", [])
  for arg, message in ((tmp_path / "nope", "no such directory"),
                       (tmp_path / "empty", "has no metrics.jsonl (an ssm-train workdir)"),
                       (tmp_path / "new", "has no rows yet")):
    proc = subprocess.run([sys.executable, "-m", "ssm.report", str(arg)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def result(family, d_model, size, seed, lr, eval_accuracy, steps=100):
  return dict(family=family, size=size, seed=seed, lr=lr, d_model=d_model, n_layer=2,
              params=1000 * d_model, train_flops_per_token=6000.0 * d_model, steps=steps,
              tokens=steps * 64, seq_len=64, eval_loss=1 - eval_accuracy,
              eval_accuracy=eval_accuracy, tokens_per_sec=1.0, evals={},
              train_flops=6000.0 * d_model * steps * 64)


def fake_comparison(workdir, results):
  """A comparison's workdir as ssm-compare leaves it: runs/<run>/ with request.json,
  metrics.jsonl (eval accuracy rising to the run's final one) and result.json."""
  for r in results:
    run = workdir / "runs" / f"{r['family']}-d{r['d_model']}-s{r['seed']}-lr{r['lr']:g}"
    write_run(run, [{"step": 50, "loss": 2.0, "eval/accuracy": r["eval_accuracy"] / 2},
                    {"step": 100, "loss": 1.0, "eval/accuracy": r["eval_accuracy"]}])
    (run / "request.json").write_text(json.dumps({"config": {"task": {"name": "mqar"}}}))
    (run / "result.json").write_text(json.dumps(r))


def test_comparison_figures_draw_the_best_runs_curves_and_a_title(tmp_path, figures):
  """ssm-compare's plot: curves.png holds the curves of the best learning rate's runs
  (both seeds) and no others; every figure is titled with the task."""
  results = [result("mamba", 64, 64, 0, 1e-3, 0.5), result("mamba", 64, 64, 0, 1e-2, 0.75),
             result("mamba", 64, 64, 1, 1e-2, 0.25), result("attention", 64, 64, 0, 1e-3, 1.0),
             result("mamba", 128, 128, 0, 1e-2, 0.9), result("attention", 128, 128, 0, 1e-3, 1.0)]
  fake_comparison(tmp_path, results)
  rows = report.best_rows(results, "eval_accuracy", "max")
  paths = report.plot(rows, tmp_path)
  assert [p.name for p in paths] == ["accuracy.png", "loss.png", "curves.png"]
  assert all(figures[p.name]._suptitle.get_text() == "MQAR" for p in paths)
  accuracy = figures["curves.png"].axes[-1]
  drawn = sorted((line.get_label(), line.get_ydata()[-1]) for line in accuracy.get_lines())
  # seed 1 shares its label (drawn unlabelled: matplotlib names it _child...)
  assert [(label, y) for label, y in drawn if not label.startswith("_")] == [
      ("attention d128", 1.0), ("attention d64", 1.0), ("mamba d128", 0.9), ("mamba d64", 0.75)]
  assert sorted(y for label, y in drawn if label.startswith("_")) == [0.25]
  # ssm-plot on the same workdir: the same curves from results.csv's rows
  report.write_tables(rows, tmp_path)
  figures.clear()
  assert report.main([str(tmp_path)]) == 0
  assert sorted(figures) == ["accuracy.png", "curves.png", "loss.png"]
  assert len(figures["curves.png"].axes[-1].get_lines()) == 5


def test_results_csv_round_trips_and_old_files_still_plot(tmp_path):
  """read_results gives back what plot needs from results.csv; files written before it
  carried size and the seeds' maxima (the ones in docs/results/) get them recovered."""
  results = [result("mamba", 64, 64, 0, 1e-2, 0.5), result("mamba", 64, 64, 1, 1e-2, 0.75),
             result("mamba", 128, 128, 0, 1e-2, 0.9), result("attention", 96, 64, 0, 1e-3, 1.0)]
  rows = report.best_rows(results, "eval_accuracy", "max")
  report.write_tables(rows, tmp_path)
  back = report.read_results(tmp_path / "results.csv")
  keys = ("family", "size", "d_model", "seq_len", "params", "train_flops", "eval_accuracy",
          "eval_accuracy_min", "eval_accuracy_max", "eval_loss", "steps", "evals")
  assert [{k: r[k] for k in keys} for r in back] == [{k: r[k] for k in keys} for r in rows]
  old = report.read_results(ROOT / "docs" / "results" / "compare-mqar" / "results.csv")
  mamba96 = next(r for r in old if r["family"] == "mamba" and r["d_model"] == 96)
  assert [r["size"] for r in old] == [0, 0, 0, 1, 1, 1]
  assert mamba96["seeds"] == 2 and mamba96["eval_accuracy_max"] == pytest.approx(
      2 * mamba96["eval_accuracy"] - mamba96["eval_accuracy_min"])
  assert mamba96["train_flops"] == mamba96["train_flops_per_token"] * mamba96["tokens"]
  heads = report.read_results(ROOT / "docs" / "results" / "compare-induction-heads" /
                              "results.csv")
  assert sorted(heads[0]["evals"]) == ["accuracy@1024", "accuracy@128", "accuracy@256",
                                       "accuracy@512"]
  bad = tmp_path / "bad.csv"
  bad.write_text("family,d_model\nmamba,64\n")
  with pytest.raises(ValueError, match=r"no comparison rows \(no eval_accuracy, eval_accuracy_min, "
                     r"eval_loss, params, seeds, steps\)"):
    report.read_results(bad)


def test_one_size_is_a_bar_per_family(tmp_path, figures):
  """Selective copying's shape (one width per family): accuracy.png is a bar per family
  with its accuracy on it and its parameters and steps under it, not a dot per family."""
  rows = report.best_rows([result("mamba", 64, 64, 0, 1e-2, 0.9921875, steps=1250),
                           result("hybrid", 64, 64, 0, 1e-2, 1.0, steps=750)],
                          "eval_accuracy", "max")
  report.plot(rows, tmp_path, title="selective copying")
  ax = figures["accuracy.png"].axes[0]
  assert [p.get_height() for p in ax.patches] == [1.0, 0.9921875]
  assert [t.get_text() for t in ax.texts] == ["1.000", "0.992"]
  assert [t.get_text() for t in ax.get_xticklabels()] == [
      "hybrid\n64k params\n750 steps", "mamba\n64k params\n1,250 steps"]
  assert figures["loss.png"]._suptitle.get_text() == "selective copying"


# --- docs that agree with the code --------------------------------------------------

def test_docs_agree_with_the_code():
  """Selective copying's noise count in its config and results README is what the task
  generates; the README's configs list names every :ARG of the small-LM task configs;
  docs/README.md points at no issue number a reader cannot see."""
  import re

  import numpy as np

  from ssm.config import SMALL_LMS, load_config_file
  from ssm.data.tasks import make_task

  task = load_config_file(str(ROOT / "configs" / "selective_copy.py:mamba")).task
  inputs, _, _ = make_task(task, 1, 0).example(np.random.default_rng(0))
  M = task.num_tokens_to_copy
  noise = int((inputs[:len(inputs) - M] == 0).sum())
  assert (noise, M) == (56, 4)
  for doc in ("configs/selective_copy.py", "configs/compare/selective_copy.py",
              "docs/results/compare-selective-copy/README.md"):
    text = " ".join((ROOT / doc).read_text().split())
    assert re.findall(r"among (\d+) noise tokens", text) == [str(noise)], doc
  line = next(l for l in (ROOT / "README.md").read_text().splitlines()
              if l.startswith("| `configs/` |"))
  small = line.split("`listops.py`:")[1].split(";")[0]
  assert re.findall(r":(\w+)", small) == list(SMALL_LMS)
  for name in ("mqar", "selective_copy", "induction_heads", "listops"):
    assert f'small_lm(arch' in (ROOT / "configs" / f"{name}.py").read_text()
  assert not re.search(r"issue \d", (ROOT / "docs" / "README.md").read_text())
