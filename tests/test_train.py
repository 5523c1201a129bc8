"""ssm.train: the loop on 1 and 8 (fake) devices and on two processes, exact resume
after SIGTERM, Ctrl-C and exit statuses, corrupt checkpoints (their metrics rows kept
aside), restoring onto another mesh, W&B records read back from disk, NaN stops, what
a run prints and records of itself, and bad meshes and batches.

Multi-device runs go through `ssm-train` in subprocesses, since the number of
fake CPU devices is fixed when JAX starts."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mqar.py")
# A tiny hybrid (Mamba + attention) so that every sharding rule is exercised.
TINY = ["--config.model.d_model=32", "--config.model.n_layer=2", "--config.model.pattern=MA",
        "--config.task.vocab_size=64", "--config.model.vocab_size=64",
        "--config.task.seq_len=32", "--config.task.num_kv_pairs=4",
        "--config.train.batch_size=16",
        "--config.train.warmup_steps=2", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.wandb.mode=disabled"]


def run_train(workdir, *overrides, devices=1, steps=20, env=None, wait=True, process=None):
  cmd = [sys.executable, "-m", "ssm.train.main", f"--config={CONFIG}:hybrid",
         f"--workdir={workdir}", f"--config.train.steps={steps}", *TINY, *overrides]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", **(env or {}))
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def losses(workdir):
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return np.array([r["loss"] for r in rows]), [r["step"] for r in rows]


def ok(result):
  code, out = result
  assert code == 0, out[-3000:]
  return out


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
  """The reference: 20 steps on one device, checkpoints every 10; (workdir, output)."""
  workdir = tmp_path_factory.mktemp("single")
  return workdir, ok(run_train(workdir, "--config.checkpoint.every=10"))


@pytest.fixture(scope="module")
def single(single_run):
  return single_run[0]


def test_a_run_says_what_it_trains_and_where_everything_is(single_run):
  from ssm.config import load_config_file
  from ssm.flops import flops, param_count
  from ssm.info import architecture
  from ssm.models import config_from_dict
  workdir, out = single_run
  c = load_config_file(f"{CONFIG}:hybrid")
  c.model.update(dict(d_model=32, n_layer=2, pattern="MA", vocab_size=64))
  model = config_from_dict(c.model)
  params, per_token = param_count(model), flops(model, 32)["total"]
  assert json.loads((workdir / "run.json").read_text()) == {
      "params": params, "forward_flops_per_token": per_token, "seq_len": 32,
      "train_flops_per_step": 3 * per_token * 16 * 32}
  lines = [l for l in out.replace("\r", "\n").splitlines()
           if l and not l.startswith(("train:", "W1", "I1"))]
  assert lines[:2] == [architecture(model), f"{params:,} parameters; {per_token:.3e} FLOPs "
                       f"per token forward at length 32, {3 * per_token * 512:.3e} per "
                       "training step (3x forward)"]
  last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert lines[-3:] == [
      f"step 20 of 20: accuracy {last['accuracy']:.4g}, loss {last['loss']:.4g}",
      "checkpoints: steps 10, 20; none ranked by eval/loss",
      f"in {workdir}: checkpoints/, config.json, metrics.jsonl, run.json"]


MESH_2X2X2 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


def test_eight_devices_with_data_fsdp_and_tensor_parallelism(single, tmp_path):
  ok(run_train(tmp_path, *MESH_2X2X2, devices=8))
  (ref, steps), (got, _) = losses(single), losses(tmp_path)
  assert steps == list(range(1, 21))
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert ref[-1] < ref[0]


def test_a_mamba_lm_on_eight_devices_equals_one_device(tmp_path):
  """(Its compiled step moves no activations inside a Mamba layer: test_sharding.py.)"""
  ok(run_train(tmp_path / "one", "--config.model.pattern=M"))
  ok(run_train(tmp_path / "eight", "--config.model.pattern=M", *MESH_2X2X2, devices=8))
  np.testing.assert_allclose(losses(tmp_path / "eight")[0], losses(tmp_path / "one")[0],
                             rtol=1e-5)


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_through_jax_distributed(single, tmp_path):
  port = free_port()
  procs = [run_train(tmp_path, f"--config.distributed.coordinator_address=localhost:{port}",
                     "--config.distributed.num_processes=2",
                     f"--config.distributed.process_id={i}", "--config.mesh.fsdp=2",
                     devices=2, wait=False) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  np.testing.assert_allclose(losses(tmp_path)[0], losses(single)[0], rtol=1e-5)


def test_sigterm_from_outside_stops_the_command_with_a_checkpoint(tmp_path):
  """A real SIGTERM to ssm-train, sent once 7 steps are logged of a run far longer
  than the signal takes to land: the run stops at the next step, saves, and exits 75
  (for schedulers to requeue on). (Exact resume after SIGTERM:
  test_sigterm_is_checked_every_log_every_steps_...)"""
  proc = run_train(tmp_path, "--config.checkpoint.every=1000", steps=2000, wait=False)
  wait_for_rows(proc, tmp_path, 7)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  stopped = len((tmp_path / "metrics.jsonl").read_text().splitlines())
  assert proc.returncode == 75, out[-3000:]
  assert out.splitlines()[-1] == (f"ssm-train: stopped by SIGTERM at step {stopped} of 2000, "
                                  f"with a checkpoint in {tmp_path / 'checkpoints'}: rerun the "
                                  "same command to resume")
  assert 7 <= stopped < 2000
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [str(stopped)]


def wait_for_rows(proc, workdir, rows):
  metrics = Path(workdir) / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
      return
    time.sleep(0.05)
  raise AssertionError(f"no {rows} rows of metrics: {proc.communicate()[0][-3000:]}")


def test_ctrl_c_saves_and_a_second_ctrl_c_stops_at_once(tmp_path):
  """Ctrl-C (SIGINT) is SIGTERM's twin: a checkpoint, one line, exit 75; a second one
  stops without saving (exit 130), also without a traceback."""
  proc = run_train(tmp_path, "--config.checkpoint.every=1000", steps=2000, wait=False)
  wait_for_rows(proc, tmp_path, 7)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  stopped = len((tmp_path / "metrics.jsonl").read_text().splitlines())
  assert proc.returncode == 75 and "Traceback" not in out, out[-3000:]
  assert f"ssm-train: stopped by Ctrl-C (SIGINT) at step {stopped} of 2000" in out
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [str(stopped)]
  proc = run_train(tmp_path, "--config.checkpoint.every=1000", steps=2000, wait=False)
  wait_for_rows(proc, tmp_path, stopped + 3)  # resumed
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
  assert out.splitlines()[-1] == ("Ctrl-C again: stopped at once, without saving; rerunning "
                                  "the same command resumes from the newest checkpoint")


def test_corrupt_latest_checkpoint_is_skipped_and_no_row_is_lost(single, tmp_path):
  import shutil
  shutil.copytree(single, tmp_path / "run")
  run = tmp_path / "run"
  before = (run / "metrics.jsonl").read_text().splitlines()
  for f in (run / "checkpoints" / "20").rglob("*"):  # the first bytes of every file
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\x96" * 8 + f.read_bytes()[8:])
  out = ok(run_train(run, "--config.checkpoint.every=10", steps=25))
  assert "checkpoint at step 20 cannot be restored" in out
  assert (run / "checkpoints" / "20.unreadable").exists()  # set aside, not deleted
  _, steps = losses(run)
  assert steps == list(range(1, 26))  # resumed from 10: rows 11..25 rewritten
  # the rows measured past step 10 the first time are kept aside, marked
  aside = (run / "metrics.superseded.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in aside] == [dict(json.loads(l), resumed_from=10)
                                           for l in before[10:]]


def test_checkpoint_from_eight_devices_restores_on_one(single, tmp_path):
  import shutil
  ok(run_train(tmp_path, "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
               "--config.checkpoint.every=10", devices=8))
  shutil.rmtree(tmp_path / "checkpoints" / "20")  # resume from the step-10 checkpoint
  out = ok(run_train(tmp_path, "--config.checkpoint.every=10", devices=1))
  assert "resumed from step 10" in out
  np.testing.assert_allclose(losses(tmp_path)[0], losses(single)[0], rtol=1e-5)


def read_wandb_records(path):
  """The records of a .wandb file (a LevelDB-style log of protobuf Records)."""
  from wandb.proto import wandb_internal_pb2

  data = Path(path).read_bytes()
  ident, magic, version = struct.unpack("<4sHB", data[:7])
  assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
  records, pos, block, payload = [], 7, 32768, b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # too little room for a header: the block is padded
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    payload += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # FULL or LAST
      record = wandb_internal_pb2.Record()
      record.ParseFromString(payload)
      records.append(record)
      payload = b""
    elif kind == 0:
      break
  return records


def test_wandb_offline_run_is_on_disk(tmp_path):
  ok(run_train(tmp_path, "--config.wandb.mode=offline", "--config.wandb.group=g1",
               "--config.wandb.tags=('a','b')", "--config.train.eval_every=5", steps=10))
  files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
  assert len(files) == 1
  records = read_wandb_records(files[0])
  kinds = {r.WhichOneof("record_type") for r in records}
  assert {"run", "history", "summary"} <= kinds
  run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
  assert run.run_group == "g1" and list(run.tags) == ["a", "b"] and run.project == "ssm"
  config = {i.key: json.loads(i.value_json) for i in run.config.update}
  for r in records:  # later config updates, if any
    if r.WhichOneof("record_type") == "config":
      config.update({i.key: json.loads(i.value_json) for i in r.config.update})
  value = lambda v: v["value"] if isinstance(v, dict) and set(v) == {"value"} else v
  assert value(config["train"])["steps"] == 10 and value(config["params"]) > 0
  assert value(config["flops_per_step"]) > 0
  history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
             for r in records if r.WhichOneof("record_type") == "history"]
  logged = [h for h in history if "loss" in h]
  assert [h["_step"] for h in logged] == list(range(1, 11))
  np.testing.assert_allclose([h["loss"] for h in logged], losses(tmp_path)[0], rtol=1e-6)
  assert any("eval/loss" in h for h in history)
  summary = {}
  for r in records:
    if r.WhichOneof("record_type") == "summary":
      summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                      for i in r.summary.update})
  assert abs(summary["loss"] - losses(tmp_path)[0][-1]) < 1e-5


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  code, out = run_train(tmp_path, "--config.train.lr=1e30", "--config.train.clip_norm=0",
                        "--config.train.warmup_steps=0", "--config.checkpoint.every=1",
                        steps=30)
  assert code == 3, out[-3000:]
  message = out[out.index("ssm-train: "):].strip()
  bad = int(message.split("at step ")[1].split()[0])
  good = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert good and max(good) < bad
  assert message.endswith(
      f"stopped. Checkpoints from before it: step {', '.join(map(str, good))} in "
      f"{tmp_path / 'checkpoints'}; the newest, {bad - max(good)} step(s) before it, may "
      "already hold diverging parameters. Rerun with a lower train.lr or more "
      "train.warmup_steps (or train.clip_norm set) in a new --workdir; or, going on from a "
      "checkpoint here (the newest, unless you move it out of checkpoints/), with a lower "
      "train.lr or more train.warmup_steps and --config.checkpoint.resume_changed=True."), message
  # no checkpoint yet: said so (not "step None")
  code, out = run_train(tmp_path / "none", "--config.train.lr=1e30", "--config.train.clip_norm=0",
                        "--config.train.warmup_steps=0", steps=30)
  assert code == 3 and out.strip().endswith(
      "No checkpoint was saved before it (checkpoint.every=500): rerun with a lower train.lr "
      "or more train.warmup_steps (or train.clip_norm set), from the start."), out[-3000:]


@pytest.mark.parametrize("override,message", [
    (["--config.mesh.data=3"], "needs 3 devices but 1 are present"),
    (["--config.mesh.data=2", "--config.train.batch_size=15"], "not divisible by the data-parallel"),
    (["--config.train.stepz=3"], "stepz"),
    (["--config.mesh.pipeline=2"], "pipeline"),
    (["--config.model.d_model=-3"], "model.d_model=-3: must be positive"),
    (["--config.train.batch_size=0"], "train.batch_size=0: must be positive"),
])
def test_bad_configs_fail_before_compiling(tmp_path, override, message):
  """In one line that names the key and the value, without a traceback."""
  devices = 2 if "--config.mesh.data=2" in override else 1
  code, out = run_train(tmp_path, *override, devices=devices)
  assert code == 2 and message in out and "Traceback" not in out, out[-2000:]
  assert not (tmp_path / "checkpoints").exists()


def test_rerun_with_another_model_is_an_error_and_other_changes_a_warning(tmp_path, caplog):
  from ssm.train import train
  train(_in_process_config(steps=4), tmp_path)
  c = _in_process_config(steps=4)
  c.model.d_model = 48
  with pytest.raises(ValueError, match="another model, task or optimizer: model.d_model"):
    train(c, tmp_path)
  with pytest.raises(ValueError, match="train.lr differ"):
    train(_in_process_config(steps=4, lr=1e-2), tmp_path)
  assert losses(tmp_path)[1] == list(range(1, 5))  # the run is still there, untouched
  with caplog.at_level("WARNING", logger="ssm.train"):
    train(_in_process_config(steps=6), tmp_path)
  assert "with changed train.steps" in caplog.text
  assert losses(tmp_path)[1] == list(range(1, 7))
  forced = _in_process_config(steps=8, lr=1e-2)
  forced.checkpoint.resume_changed = True
  train(forced, tmp_path)
  assert losses(tmp_path)[1] == list(range(1, 9))
  # resume_changed with other shapes: a config error naming them, at once (no retries);
  # the run's config.json is still its own
  kept = (tmp_path / "config.json").read_text()
  c.checkpoint.resume_changed = True
  with pytest.raises(ValueError, match=r"step 8 .* not this run's state: \d+ arrays differ, "
                     r"e.g. opt_state/.*: saved \(\d+, 32\), the run has \(\d+, 48\)"):
    train(c, tmp_path)
  assert (tmp_path / "config.json").read_text() == kept
  # a key the run's config.json lacks (added to ssm since): a warning, not another model
  saved = json.loads(kept)
  del saved["model"]["attention"]["rope"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  caplog.clear()
  with caplog.at_level("WARNING", logger="ssm.train"):
    train(_in_process_config(steps=10, lr=1e-2), tmp_path)
  assert "with changed model.attention.rope, train.steps" in caplog.text
  # a start that saved nothing (config.json and an empty checkpoints/) holds no run yet
  failed = tmp_path.parent / "failed"
  (failed / "checkpoints").mkdir(parents=True)
  (failed / "config.json").write_text((tmp_path / "config.json").read_text())
  train(c, failed)  # another model: fine, there was nothing to resume


def _in_process_config(**train):
  import importlib.util
  spec = importlib.util.spec_from_file_location("mqar_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("hybrid")
  c.model.update(dict(d_model=32, n_layer=2, vocab_size=64))
  c.task.update(dict(vocab_size=64, seq_len=32, num_kv_pairs=4))
  c.train.update(dict(dict(batch_size=16, warmup_steps=2, log_every=1, eval_every=0, steps=8),
                      **train))
  c.wandb.mode = "disabled"
  return c


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
  from ssm.train import train
  train(_in_process_config(), tmp_path / "full")
  train(_in_process_config(grad_accum=4), tmp_path / "accum")
  np.testing.assert_allclose(losses(tmp_path / "accum")[0], losses(tmp_path / "full")[0],
                             rtol=1e-5)


def test_early_stop_at_a_threshold_or_a_plateau_and_rerun_is_complete(tmp_path):
  from ssm.train import train
  train(_in_process_config(eval_every=2, stop_when="eval/accuracy>=0.0"), tmp_path / "t")
  assert losses(tmp_path / "t")[1][-1] == 2
  rows = (tmp_path / "t" / "metrics.jsonl").read_text()
  train(_in_process_config(eval_every=2, stop_when="eval/accuracy>=0.0"), tmp_path / "t")
  assert (tmp_path / "t" / "metrics.jsonl").read_text() == rows  # complete: nothing rerun
  # lr 0: the eval loss never improves, so patience 2 stops at the third eval
  train(_in_process_config(eval_every=2, lr=0.0, patience=2), tmp_path / "p")
  assert losses(tmp_path / "p")[1][-1] == 6
  with pytest.raises(ValueError, match="METRIC>=VALUE"):
    train(_in_process_config(eval_every=2, stop_when="accuracy>0.5"), tmp_path / "bad")


def test_bfloat16_compute_trains_every_mixer(tmp_path, monkeypatch):
  from ssm.train import train
  c = _in_process_config(steps=30)
  c.model.dtype = "bfloat16"
  # every mixer: Mamba, Mamba-2 (its chunked SSD in bf16) and attention
  c.model.update(dict(pattern="MSA", n_layer=3))
  c.model.mamba2.update(dict(d_state=16, headdim=16))
  c.checkpoint.every = 10
  monkeypatch.chdir(tmp_path)
  train(c, "run")  # a relative workdir
  got, _ = losses(tmp_path / "run")
  assert np.all(np.isfinite(got)) and got[-5:].mean() < got[:5].mean()


def _column(workdir, key):
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return np.array([r[key] for r in rows if key in r])


def test_gradient_accumulation_is_the_global_masked_mean(tmp_path):
  """Microbatches that score different numbers of tokens: the accumulated loss and
  gradient are the whole batch's token mean (not the mean of microbatch means)."""
  import jax
  from ssm.train.loop import Trainer
  out = {}
  for accum in (1, 4):
    trainer = Trainer(_in_process_config(grad_accum=accum), tmp_path / str(accum))
    state = trainer.init_state()
    batch = next(trainer.batches())
    mask = np.asarray(batch["loss_mask"]).copy()
    mask[0:4, 1:] = 0  # the first rows score one token each
    mask[1::4] = 0  # and every fourth row nothing: unequal counts under any split
    batch["loss_mask"] = jax.device_put(mask, batch["loss_mask"].sharding)
    _, metrics = trainer.compile_step(state, batch)(state, batch)
    out[accum] = {k: float(metrics[k]) for k in ("loss", "accuracy", "grad_norm")}
  for k in out[1]:
    np.testing.assert_allclose(out[4][k], out[1][k], rtol=2e-6, err_msg=k)


def test_mfu_counts_the_models_flops(tmp_path):
  """MFU's numerator is ssm.flops' count (3x forward), whatever XLA's cost analysis
  makes of loops: an attention LM counted by hand, and a hybrid whose Mamba scan and
  gradient-accumulation loop XLA counts once."""
  from ssm.flops import lm_flops
  from ssm.models import config_from_dict
  from ssm.train import train
  peak, B, L, D, V = 1e12, 16, 32, 32, 64
  c = _in_process_config(steps=3, peak_flops_per_device=peak)
  c.model.update(dict(pattern="A", mlp="none"))
  c.model.attention.n_heads = 1
  train(c, tmp_path / "attention")
  # per token and layer: q, k, v, o (8 D^2), scores and values (4 L D), the norm (4 D);
  # then the final norm and the tied head
  forward = 2 * (8 * D * D + 4 * L * D + 4 * D) + 4 * D + 2 * D * V
  counted = _column(tmp_path / "attention", "mfu") * peak * _column(tmp_path / "attention",
                                                                     "step_time")
  np.testing.assert_allclose(counted, 3 * forward * B * L, rtol=1e-6)
  for accum in (1, 2):
    c = _in_process_config(steps=3, peak_flops_per_device=peak, grad_accum=accum)
    train(c, tmp_path / f"hybrid{accum}")
    counted = (_column(tmp_path / f"hybrid{accum}", "mfu")
               * _column(tmp_path / f"hybrid{accum}", "step_time") * peak)
    want = 3 * lm_flops(config_from_dict(c.model), L)["total"] * B * L
    np.testing.assert_allclose(counted, want, rtol=1e-6)


def test_sigterm_is_checked_every_log_every_steps_and_resume_is_exact(tmp_path, monkeypatch,
                                                                      capsys):
  """SIGTERM arrives during step 4 (sent by the process to itself, so the test cannot
  race); with log_every 3 every process looks for it at step 6, stops there with a
  checkpoint, and the rerun finishes as an uninterrupted run, bit for bit, past the
  warmup and through the cosine."""
  from ssm.train import loop, train
  config = lambda: _in_process_config(steps=12, log_every=3, warmup_steps=2)
  train(config(), tmp_path / "ref")
  checks = []
  advance = loop.MetricsWriter.advance
  any_ = loop.SignalFlag.any

  def advance_and_signal(self):
    advance(self)
    if self.bar.n == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop.MetricsWriter, "advance", advance_and_signal)
  monkeypatch.setattr(loop.SignalFlag, "any", lambda self: checks.append(1) or any_(self))
  with pytest.raises(loop.Stopped, match="stopped by SIGTERM at step 6 of 12"):
    train(config(), tmp_path / "run")
  assert len(checks) == 2  # at steps 3 and 6: once per log_every, not every step
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [6]
  monkeypatch.undo()
  train(config(), tmp_path / "run")
  for key in ("loss", "lr"):
    np.testing.assert_array_equal(_column(tmp_path / "run", key), _column(tmp_path / "ref", key))


def test_a_signal_during_the_last_step_lets_the_run_finish(tmp_path, monkeypatch):
  """Nothing is left to resume: the run ends as finished (train returns; exit 0)."""
  from ssm.train import loop, train
  advance = loop.MetricsWriter.advance

  def advance_and_signal(self):
    advance(self)
    if self.bar.n == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop.MetricsWriter, "advance", advance_and_signal)
  final = train(_in_process_config(steps=4, log_every=2), tmp_path)
  assert final["loss"] == losses(tmp_path)[0][-1] and losses(tmp_path)[1] == [2, 4]


def test_a_longer_resumed_run_keeps_its_schedule_unless_asked(tmp_path, caplog):
  from ssm.train import train
  c = lambda **kw: _in_process_config(warmup_steps=2, **kw)
  train(c(steps=6), tmp_path / "six")
  train(c(steps=12), tmp_path / "twelve")
  import shutil
  shutil.copytree(tmp_path / "six", tmp_path / "kept")
  shutil.copytree(tmp_path / "six", tmp_path / "recomputed")
  with caplog.at_level("WARNING", logger="ssm.train"):
    train(c(steps=12), tmp_path / "kept")
  assert "started with a 6-step learning-rate schedule" in caplog.text
  kept, twelve = (_column(tmp_path / d, "lr") for d in ("kept", "twelve"))
  # the steps taken followed a 6-step schedule, so the resumed ones go on at its final
  # rate (a 12-step cosine restarted at step 7 would give the 12-step run's rates)
  final = c().train.lr * c().train.min_lr_ratio
  np.testing.assert_allclose(kept[6:], np.full(6, final), rtol=1e-6)
  train(c(steps=12, schedule_steps=12), tmp_path / "recomputed")
  np.testing.assert_allclose(_column(tmp_path / "recomputed", "lr")[6:], twelve[6:], rtol=1e-6)


def test_best_checkpoint_is_ranked_only_by_an_eval_of_its_own_step(tmp_path, capsys):
  import orbax.checkpoint as ocp
  from ssm.train import train
  c = _in_process_config(steps=8, eval_every=2)
  c.checkpoint.update(dict(every=3, keep=10, async_save=False))
  train(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
  best = min((6, 8), key=evals.get)
  assert (f"checkpoints: steps 3, 6, 8; best by eval/loss: step {best} (eval/loss "
          f"{evals[best]:.4g})") in capsys.readouterr().out
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  assert manager.all_steps() == [3, 6, 8]
  assert manager.metrics(3) is None  # step 3 had no eval: it does not compete for best
  for step in (6, 8):
    assert manager.metrics(step) == {"eval/loss": pytest.approx(evals[step])}
  # load_model: the run's model with a checkpoint's parameters (the newest, a step, the best)
  import optax
  from flax import nnx
  from ssm.train.checkpoint import load_model
  model, config, step = load_model(tmp_path)
  assert step == 8 and config.model.d_model == 32
  norm = float(optax.tree.norm(nnx.to_pure_dict(nnx.state(model))))
  assert norm == pytest.approx(rows[-1]["param_norm"], rel=1e-6)  # step 8's, as the loop logged it
  assert load_model(tmp_path, best=True)[2] == min((6, 8), key=evals.get)
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 5"):
    load_model(tmp_path, step=5)
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    load_model(tmp_path / "checkpoints")
  # best=True where nothing is ranked: no best metric, or no eval at a checkpoint's step
  c.checkpoint.best_metric = ""
  train(c, tmp_path / "unranked")
  with pytest.raises(ValueError, match="trained without checkpoint.best_metric: no checkpoint"):
    load_model(tmp_path / "unranked", best=True)
  assert load_model(tmp_path / "unranked")[2] == 8
  train(_in_process_config(steps=3), tmp_path / "no-eval-at-a-checkpoint")  # eval_every 0
  with pytest.raises(FileNotFoundError, match=r"no checkpoint is ranked by eval/loss, which "
                     r"only an eval at a checkpoint's own step gives \(saved steps: \[3\]\)"):
    load_model(tmp_path / "no-eval-at-a-checkpoint", best=True)
  config_json = json.loads((tmp_path / "config.json").read_text())
  config_json["model"]["d_model"] = 48
  (tmp_path / "config.json").write_text(json.dumps(config_json))
  with pytest.raises(ValueError, match="not the model its config.json builds"):
    load_model(tmp_path)


@pytest.mark.parametrize("status,requeued", [(75, True), (0, False), (3, False)])
def test_slurm_script_requeues_a_run_stopped_by_a_signal(tmp_path, status, requeued):
  """scripts/slurm_train.sh with stand-ins for srun (exits as ssm-train would) and
  scontrol (records its arguments)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/srun\nexit {status}\n")
  (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/scontrol\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  script = Path(__file__).resolve().parents[1] / "scripts" / "slurm_train.sh"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="123")
  proc = subprocess.run(["bash", str(script), "--config.train.steps=7"], env=env,
                        capture_output=True, text=True, cwd=tmp_path)
  assert proc.returncode == status, proc.stderr
  assert (tmp_path / "srun").read_text().split() == [
      "ssm-train", "--config", "configs/bytes.py:mamba", "--workdir", "runs/slurm-123",
      "--config.distributed.auto=True", "--config.mesh.data=-1", "--config.train.steps=7"]
  assert (tmp_path / "scontrol").exists() == requeued
  if requeued:
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "123"]
