"""ssm.compare: the plan matches sizes; a killed sweep finishes on rerun without
redoing finished runs; tables and plots are written; every paper reproduction in
configs/compare/ runs end to end at a tiny size."""

import csv
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ml_collections as mlc
from absl import flags

from ssm.compare import compare as run_compare
from ssm.compare import base_config, learning_rates, load_config_file, plan, run_config
from ssm.config import _check_key
from ssm.flops import lm_flops, lm_params, vision_flops
from ssm.models import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "compare" / "mqar.py")
TINY = ["--config.overrides.train.steps=6", "--config.overrides.train.eval_every=6",
        "--config.overrides.train.log_every=3", "--config.overrides.checkpoint.every=3",
        "--config.wandb_mode=disabled", "--config.sizes=(32,)", "--config.seeds=(0,)",
        "--config.lrs.attention=(3e-3,)", "--config.lrs.mamba=(3e-3,)",
        "--config.lrs.hybrid=(3e-3,)"]
REPRODUCTIONS = ["mqar", "induction_heads", "selective_copy", "bytes"]


def test_plan_matches_every_family_within_tolerance():
  cfg = load_config_file(CONFIG)
  cfg.families, cfg.match = ("mamba", "transformer++", "hybrid"), "params"
  cfg.sizes = (120, 128)
  cfg.lrs = mlc.ConfigDict({f: (1e-3, 3e-3) for f in cfg.families})
  cfg.seeds = (0,)
  runs = plan(cfg)
  assert len(runs) == 2 * 3 * 2
  assert {r.model.n_layer for r in runs} == {2}  # same depth, as Zoology
  for size in (120, 128):
    target = lm_params(next(r.model for r in runs if r.family == "mamba" and r.size == size))
    for r in runs:
      if r.size == size:
        assert abs(lm_params(r.model) - target) / target <= 0.02
  hybrid = next(r.model for r in runs if r.family == "hybrid")
  assert set(hybrid.layer_mixers) == {"M", "A"}
  cfg.sizes = (64,)
  with pytest.raises(ValueError, match="cannot be matched .* at its depth"):
    plan(cfg)
  cfg.same_depth = False  # free depth: no Transformer++ of two layers or more is as small
  with pytest.raises(ValueError, match="cannot be matched .* by any shape papers train"):
    plan(cfg)
  cfg.sizes = (120, 128)
  assert len(plan(cfg)) == 2 * 3 * 2


def test_width_plan_is_zoologys_axis():
  """match="width": every family at the reference's width and depth, mixer-only
  attention among them, every seed and learning rate."""
  cfg = load_config_file(CONFIG)
  runs = plan(cfg)
  sweep = sum(len(learning_rates(cfg, f)) for f in cfg.families)
  assert len(runs) == len(cfg.sizes) * len(cfg.seeds) * sweep
  for r in runs:
    assert (r.model.d_model, r.model.n_layer) == (r.size, 2)
  attention = next(r.model for r in runs if r.family == "attention")
  assert (attention.layer_mixers, attention.mlp) == ("AA", "none")


def test_flop_matching_uses_each_swept_length():
  """Attention's FLOPs grow with the length: each length gets its own match."""
  cfg = load_config_file(CONFIG)
  cfg.match, cfg.same_depth, cfg.sizes, cfg.seq_lens = "flops", False, (384,), (64, 1024)
  cfg.tolerance = 0.02
  cfg.families = ("mamba", "transformer++", "hybrid")
  cfg.lrs = mlc.ConfigDict({f: (3e-3,) for f in cfg.families})
  runs = plan(cfg)
  for seq_len in (64, 1024):
    at = [r for r in runs if r.seq_len == seq_len]
    target = 3 * lm_flops(next(r.model for r in at if r.family == "mamba"), seq_len)["total"]
    for r in at:
      assert abs(3 * lm_flops(r.model, seq_len)["total"] - target) / target <= 0.02, r.name
  tpp = {r.seq_len: r.model for r in runs if r.family == "transformer++"}
  assert tpp[64] != tpp[1024]


def test_lm_runs_keep_the_base_models_settings():
  """Every model setting of the base config and overrides.model reaches every run
  unless the family sets it: bytes.py:paper's bfloat16, a Mamba state size."""
  cfg = load_config_file(str(ROOT / "configs" / "compare" / "bytes.py") + ":paper")
  runs = plan(cfg)
  assert {r.family for r in runs} == {"mamba", "transformer++", "hybrid"}
  assert {r.model.dtype for r in runs} == {"bfloat16"}
  assert {run_config(cfg, r).model.dtype for r in runs} == {"bfloat16"}
  cfg = load_config_file(CONFIG)
  cfg.families = ("attention", "mamba", "hybrid", "mamba2")
  cfg.overrides.model.mamba.d_state = 8
  cfg.overrides.model.mamba2.headdim = 32
  runs = plan(cfg)
  mamba = {r.family: run_config(cfg, r).model for r in runs}
  assert mamba["mamba"].mamba.d_state == mamba["hybrid"].mamba.d_state == 8
  assert mamba["mamba2"].mamba2.headdim == 32 and mamba["mamba2"].pattern == "S"
  assert mamba["attention"].attention.n_heads == 1  # the family's own


def test_a_base_with_the_tasks_vocabulary_plans_with_it():
  """model.vocab_size=0 (configs/text.py: the tokenizer's) is resolved before matching."""
  cfg = load_config_file(str(ROOT / "configs" / "compare" / "bytes.py"))
  cfg.base, cfg.overrides.task = "configs/text.py:mamba", mlc.ConfigDict()
  assert {r.model.vocab_size for r in plan(cfg)} == {1024}  # its BPE's 1024 ids


def test_overrides_take_any_key_of_the_run_config(monkeypatch):
  """overrides.<section>.<key> for keys the comparison file does not set, checked
  against the run config's keys and types; lrs as one tuple for every family."""
  from test_config import parse
  monkeypatch.chdir(ROOT)
  cfg = parse("configs/compare/mqar.py", "--config.overrides.train.warmup_steps=5",
              "--config.overrides.model.dtype=bfloat16", "--config.overrides.task.seq_len=128",
              "--config.lrs=(3e-3,)")
  runs = plan(cfg)
  assert {r.lr for r in runs} == {3e-3} and len(runs) == 2 * 3 * 2  # sizes, families, seeds
  c = run_config(cfg, runs[0])
  assert (c.train.warmup_steps, c.model.dtype, c.task.seq_len) == (5, "bfloat16", 128)
  assert c.train.steps == 640  # the file's own overrides kept
  unset = base_config(load_config_file(CONFIG))  # not overridden: configs/mqar.py's own
  assert unset.train.warmup_steps == load_config_file(cfg.base).train.warmup_steps == 50
  cfg = parse("configs/compare/images.py", "--config.overrides.task.path=data/fmnist")
  assert run_config(cfg, plan(cfg)[0]).task.path == "data/fmnist"
  cfg = parse("configs/compare/mqar.py", "--config.lrs.mamba=(1e-2,)")
  assert learning_rates(cfg, "mamba") == (1e-2,) and learning_rates(cfg, "hybrid") == (1e-3, 3e-3)
  with pytest.raises(ValueError, match="'warmup_step': did you mean 'warmup_steps'"):
    _check_key(load_config_file(CONFIG), "overrides.train.warmup_step")
  with pytest.raises(flags.IllegalFlagValueError):
    parse("configs/compare/mqar.py", "--config.overrides.train.warmup_steps=abc")


def test_matched_shapes_are_ones_papers_train():
  """Free depth: width / depth within ASPECT_BAND of the reference's (scaled by the
  family's usual), two layers at least, heads at least 16 wide (or the reference's);
  where no such shape is within tolerance, the error says so, and advises freeing the
  depth only where it is fixed."""
  shapes = {}
  for name, match in [("mqar", "flops"), ("bytes", "flops"), ("images", "flops"),
                      ("bytes", "params")]:
    cfg = load_config_file(str(ROOT / "configs" / "compare" / f"{name}.py"))
    cfg.match, cfg.same_depth = match, False
    for r in plan(cfg):
      shapes[name, match, r.size, r.family] = (r.model.d_model, r.model.n_layer)
  assert shapes == {
      ("mqar", "flops", 64, "attention"): (56, 4), ("mqar", "flops", 64, "mamba"): (64, 2),
      ("mqar", "flops", 64, "hybrid"): (72, 2), ("mqar", "flops", 96, "attention"): (72, 5),
      ("mqar", "flops", 96, "mamba"): (96, 2), ("mqar", "flops", 96, "hybrid"): (80, 3),
      ("bytes", "flops", 80, "mamba"): (80, 3), ("bytes", "flops", 80, "transformer++"): (64, 2),
      ("bytes", "flops", 80, "hybrid"): (96, 2), ("bytes", "flops", 96, "mamba"): (96, 3),
      ("bytes", "flops", 96, "transformer++"): (80, 2), ("bytes", "flops", 96, "hybrid"): (80, 4),
      ("images", "flops", 40, "vit"): (40, 3), ("images", "flops", 40, "vit+reg"): (40, 3),
      ("images", "flops", 40, "vim"): (32, 3), ("images", "flops", 40, "vim+reg"): (16, 6),
      ("bytes", "params", 80, "mamba"): (80, 3), ("bytes", "params", 80, "transformer++"): (64, 3),
      ("bytes", "params", 80, "hybrid"): (88, 3), ("bytes", "params", 96, "mamba"): (96, 3),
      ("bytes", "params", 96, "transformer++"): (88, 2), ("bytes", "params", 96, "hybrid"): (104, 3)}
  cfg = load_config_file(str(ROOT / "configs" / "compare" / "selective_copy.py"))
  cfg.match, cfg.same_depth = "params", False
  with pytest.raises(ValueError) as e:
    plan(cfg)
  assert str(e.value) == (
      "transformer++ cannot be matched to mamba d_model 64 within 2% by any shape papers "
      "train (width / depth 16-256, heads at least 16 wide; params of the closest, d_model 64 "
      "x 2 layers, differ by +25.2%); try another size or a larger --config.tolerance")
  cfg.same_depth = True
  with pytest.raises(ValueError, match="at its depth, 2 layers .* free the depth with "
                                       "--config.same_depth=False"):
    plan(cfg)


def documented_commands():
  """Every ssm-compare command in README.md, docs/ and configs/compare/'s docstrings
  (continuation lines joined, comments dropped), as argument lists."""
  import ast
  texts = [p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]]
  texts += [ast.get_docstring(ast.parse(p.read_text()))
            for p in sorted((ROOT / "configs" / "compare").glob("*.py"))]
  commands = []
  for text in texts:
    for line in re.findall(r"ssm-compare (--config[^`|\n]*)", text.replace("\\\n", " ")):
      commands.append(shlex.split(line, comments=True))
  return commands


def test_every_documented_comparison_plans(monkeypatch):
  """Each command the docs show gets its plan (matched within its tolerance), without
  training."""
  from test_config import parse
  monkeypatch.chdir(ROOT)
  commands = documented_commands()
  assert len(commands) >= 20
  specs = set()
  for args in commands:
    spec = args[args.index("--config") + 1] if "--config" in args else next(
        a.split("=", 1)[1] for a in args if a.startswith("--config="))
    overrides = [a for a in args if a.startswith("--config.")]
    runs = plan(parse(spec, *overrides))
    assert runs, args
    specs.add((spec, *overrides))
  assert ("configs/compare/bytes.py", "--config.match=flops") in specs
  assert ("configs/compare/mqar.py", "--config.match=flops", "--config.same_depth=False") in specs


def compare(workdir, *extra, wait=True, start_new_session=False):
  cmd = [sys.executable, "-m", "ssm.compare", f"--config={CONFIG}", f"--workdir={workdir}",
         *TINY, *extra]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          start_new_session=start_new_session)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-3000:]
  return out


def test_killed_sweep_finishes_without_redoing_runs(tmp_path):
  proc = compare(tmp_path, wait=False)
  runs = tmp_path / "runs"
  deadline = time.time() + 600
  while time.time() < deadline and len(list(runs.glob("*/result.json"))) < 1:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)  # no clean shutdown at all
  proc.communicate()
  finished = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/result.json")}
  assert 1 <= len(finished) < 3
  out = compare(tmp_path, "--config.parallel=2")  # the rest, two at a time
  assert out.count("finished, skipped") == len(finished)
  for name, mtime in finished.items():
    assert (runs / name / "result.json").stat().st_mtime_ns == mtime
  results = [json.loads(p.read_text()) for p in runs.glob("*/result.json")]
  assert sorted(r["family"] for r in results) == ["attention", "hybrid", "mamba"]
  table = (tmp_path / "results.md").read_text()
  assert all(f in table for f in ("mamba", "attention", "hybrid", "eval_loss"))
  assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == 3
  assert_figures([tmp_path / "loss.png"])


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_failing_run_is_one_line_and_no_fork(parallel, tmp_path):
  """A run whose config cannot run (found inside the run, in this process or its own):
  one line naming the run and what to change, exit 2, no traceback, no advice to
  rerun, and no os.fork() warning from starting the runs."""
  proc = compare(tmp_path, "--config.overrides.train.log_every=0",
                 f"--config.parallel={parallel}", wait=False)
  out, _ = proc.communicate(timeout=600)
  errors = [l for l in out.splitlines() if l.startswith("ssm-compare:")]
  assert proc.returncode == 2, out[-3000:]
  assert len(errors) == 1 and errors[0].endswith(": train.log_every=0: must be >= 1"), out[-3000:]
  assert errors[0].startswith("ssm-compare: run ") and "-ref32-s0-lr0.003" in errors[0]
  assert "Traceback" not in out and "fork" not in out and "rerun" not in out, out[-3000:]


@pytest.mark.parametrize("how", ["ctrl-c", "a run stopped"])
def test_an_interrupted_comparison_says_it_resumes(how, monkeypatch, tmp_path):
  """Ctrl-C (or SIGTERM) while runs are in progress sends each SIGTERM (a run saves a
  checkpoint and exits 75, as ssm-train) and stops the comparison, saying to rerun it;
  a run that exits 75 by itself (a signal to it alone) is reported so too, not as a
  failure. Stand-in runs: processes that exit 75 on SIGTERM."""
  import ssm.compare as sc
  child = ("import signal, sys, time; from pathlib import Path; "
           "signal.signal(signal.SIGTERM, lambda *_: sys.exit(75)); "
           "(Path(sys.argv[1]) / 'started').touch(); "
           + ("time.sleep(60)" if how == "ctrl-c" else "sys.exit(75)"))
  popen, sleep, procs = subprocess.Popen, time.sleep, []

  def start(cmd, env):
    procs.append(popen([sys.executable, "-c", child, cmd[-1]], env=env))
    return procs[-1]

  def wait(seconds):  # Ctrl-C once both runs have started
    if how == "ctrl-c" and len(list(tmp_path.glob("*/started"))) == 2:
      raise KeyboardInterrupt
    sleep(0.05)

  monkeypatch.setattr(sc.subprocess, "Popen", start)
  monkeypatch.setattr(sc.time, "sleep", wait)
  run_dirs = [tmp_path / "a", tmp_path / "b"]
  for d in run_dirs:
    d.mkdir()
  with pytest.raises(sc.Stopped) as e:
    sc._run_in_parallel([("label", d) for d in run_dirs], 2)
  assert re.fullmatch(
      "stopped by Ctrl-C; the runs in progress saved checkpoints: rerun the comparison to "
      "resume it" if how == "ctrl-c" else  # whichever run ends first
      "run [ab] was stopped by a signal, with a checkpoint: rerun the comparison to resume it",
      str(e.value))
  codes = [p.wait(timeout=30) for p in procs]  # none left running
  if how == "ctrl-c":  # (else the other run may have been stopped while still starting)
    assert codes == [75, 75]


def assert_figures(paths):
  """Each a PNG as ssm.report draws it: 120 dpi, 3.8 or 4 inches high, a width of
  whole tenths of an inch."""
  import matplotlib.image
  for path in paths:
    height, width, _ = matplotlib.image.imread(path).shape
    assert height in (456, 480) and width % 12 == 0, (path, height, width)


def _tiny(cfg):
  """A reproduction at its smallest: one size, seed and learning rate per family, two
  steps, evaluated once (at every evaluation length the config names)."""
  cfg.sizes, cfg.seeds, cfg.parallel, cfg.wandb_mode = cfg.sizes[:1], (0,), 1, "disabled"
  if isinstance(cfg.lrs, mlc.ConfigDict):
    for family in cfg.lrs:
      cfg.lrs[family] = cfg.lrs[family][:1]
  else:
    cfg.lrs = cfg.lrs[:1]
  cfg.overrides.train.update(steps=2, eval_every=2, eval_steps=1, log_every=1)
  cfg.overrides.checkpoint.every = 2
  return cfg


@pytest.mark.parametrize("name", REPRODUCTIONS)
def test_each_reproduction_runs_end_to_end(name, tmp_path):
  """The pipeline and the table of each paper's reproduction (not its accuracy: that
  is for the full runs in docs/results/), and its paper setting plans."""
  cfg = _tiny(load_config_file(str(ROOT / "configs" / "compare" / f"{name}.py")))
  cfg.families = cfg.families[:2]  # the pipeline, not the families (each tested elsewhere)
  workdir, table, figures = run_compare(cfg, tmp_path)
  rows = list(csv.DictReader((tmp_path / "results.csv").open()))
  assert sorted(r["family"] for r in rows) == sorted(cfg.families)
  assert all(float(r["steps"]) == 2 for r in rows)
  assert "The paper: " in table and all(f in table for f in cfg.families)
  assert_figures(figures)
  base = load_config_file(cfg.base)
  extra = [f"accuracy@{n}" for n in base.task.get("eval_seq_lens", ()) if n != base.task.seq_len]
  if name == "bytes":
    extra = ["bits_per_byte"]
  assert all(k in rows[0] and rows[0][k] != "nan" for k in extra), (extra, rows[0].keys())
  paper = load_config_file(str(ROOT / "configs" / "compare" / f"{name}.py") + ":paper")
  assert plan(paper)


def test_first_seed_sweep_runs_other_seeds_at_its_best_rate(monkeypatch, tmp_path, caplog):
  """lr_sweep="first_seed": every rate at seed 0, then seeds 1 and 2 only at the rate
  that was best at seed 0, per (family, size); the table reports that rate. One line
  says the plan first."""
  import ssm.compare as sc
  cfg = load_config_file(CONFIG)
  cfg.sizes, cfg.seeds, cfg.lr_sweep = (64,), (0, 1, 2), "first_seed"
  cfg.families = ("attention", "mamba")
  cfg.lrs = mlc.ConfigDict({"attention": (1e-3, 3e-3, 1e-2), "mamba": (1e-3, 3e-3)})
  good = {"attention": 3e-3, "mamba": 1e-3}
  batches = []

  def fake_execute(cfg, runs, workdir):
    batches.append(runs)
    return [dict(family=r.family, size=r.size, seed=r.seed, lr=r.lr, seq_len=64,
                 eval_accuracy=(0.9 if r.lr == good[r.family] else 0.5) + 0.01 * r.seed,
                 eval_loss=1.0, tokens_per_sec=1.0, steps=1, tokens=1, train_flops=1.0,
                 evals={}) for r in runs]

  monkeypatch.setattr(sc, "_execute", fake_execute)
  with caplog.at_level("INFO", logger="ssm.compare"):
    results = sc.execute(cfg, tmp_path)
  first, rest = batches
  assert "attention, mamba matched on width (ref 64: attention d64 l2, mamba d64 l2); " \
         f"seeds (0, 1, 2); 9 runs, 2 at a time -> {tmp_path}" in caplog.text
  assert {(r.family, r.lr) for r in first} == {("attention", 1e-3), ("attention", 3e-3),
                                              ("attention", 1e-2), ("mamba", 1e-3),
                                              ("mamba", 3e-3)}
  assert all(r.seed == 0 for r in first)
  assert sorted((r.family, r.seed, r.lr) for r in rest) == [
      ("attention", 1, 3e-3), ("attention", 2, 3e-3), ("mamba", 1, 1e-3), ("mamba", 2, 1e-3)]
  rows = sc.best_rows(results, "eval_accuracy", "max")
  assert [(r["family"], r["lr"], r["seeds"]) for r in rows] == [("attention", 3e-3, 3),
                                                                 ("mamba", 1e-3, 3)]
  assert rows[0]["eval_accuracy_min"] == 0.9 and rows[0]["eval_accuracy_max"] == 0.92


def test_finished_runs_of_another_config_are_an_error_not_reused(tmp_path):
  """A finished run is reused only if it was trained with the config asked for now."""
  cfg = _tiny(load_config_file(CONFIG))
  cfg.families = ("attention",)
  run_compare(cfg, tmp_path)
  cfg.overrides.train.warmup_steps = 1  # same run names, another recipe
  with pytest.raises(ValueError, match="another config"):
    run_compare(cfg, tmp_path)


# --- image families ------------------------------------------------------------------

IMAGES = str(ROOT / "configs" / "compare" / "images.py")
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("setting", ["", ":cifar10", ":paper"])
def test_image_plan_matches_every_vision_family_within_tolerance(setting):
  """ViT, ViT+registers, Vim and Vim+registers matched to the reference ViT on its
  images, on parameters and on training FLOPs per image."""
  from ssm.flops import vision_flops, vision_params
  cfg = load_config_file(IMAGES + setting)
  for criterion, measure in (("params", vision_params),
                             ("flops", lambda c: 3 * vision_flops(c)["total"])):
    cfg.match = criterion
    runs = plan(cfg)
    assert {r.family for r in runs} == {"vit", "vit+reg", "vim", "vim+reg"}
    ref = next(r.model for r in runs if r.family == "vit")
    assert ref.d_model == cfg.sizes[0] and ref.n_layer == cfg.reference.n_layer
    for r in runs:
      assert abs(measure(r.model) - measure(ref)) / measure(ref) <= 0.02, r.name
      assert r.model.num_registers == (4 if r.family.endswith("+reg") else 0)
      assert (r.model.image_size, r.model.patch_size, r.model.num_classes) == (
          ref.image_size, ref.patch_size, ref.num_classes)


def test_image_plan_bad_input():
  cfg = load_config_file(IMAGES)
  cfg.families = ("vit", "mamba")
  with pytest.raises(ValueError, match="mix image families"):
    plan(cfg)
  cfg = load_config_file(IMAGES)
  cfg.seq_lens = (64,)
  with pytest.raises(ValueError, match="image families have none"):
    plan(cfg)


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_image_comparison_runs_end_to_end(tmp_path):
  """The table has the image columns (registers, FLOPs per image, images/s) and the
  figures plot accuracy against parameters and FLOPs."""
  cfg = _tiny(load_config_file(IMAGES))
  cfg.families = ("vit+reg",)  # matched to the reference ViT; one run
  _, table, figures = run_compare(cfg, tmp_path)
  rows = {r["family"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
  assert set(rows) == {"vit+reg"} and "images_per_sec" in table
  assert rows["vit+reg"]["registers"] == "4" and rows["vit+reg"]["d_model"] == str(cfg.sizes[0])
  for r in rows.values():
    assert float(r["steps"]) == 2 and float(r["images"]) == 2 * 32
    assert 0 <= float(r["eval_accuracy"]) <= 1
  (run,) = (tmp_path / "runs").iterdir()
  model = config_from_dict(json.loads((run / "request.json").read_text())["config"]["model"])
  assert float(rows["vit+reg"]["train_flops_per_image"]) == 3 * vision_flops(model)["total"]
  metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  speeds = [m["images_per_sec"] for m in metrics[1:] if "images_per_sec" in m]
  assert float(rows["vit+reg"]["images_per_sec"]) == pytest.approx(statistics.median(speeds))
  assert [Path(f).name for f in figures] == ["accuracy.png", "loss.png", "curves.png"]
  assert_figures(figures)
