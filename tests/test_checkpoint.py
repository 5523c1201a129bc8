"""ssm.train.checkpoint: which restore errors set a checkpoint aside (positive signs of
corruption, each made here by damaging a real checkpoint, checksums included) and
which are retried and then stop the run with the checkpoint left in place; a state of
another shape is a configuration error; the verdict agreed on by all processes,
simulated and on two real processes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ssm.train import checkpoint as C
from ssm.config import base


def cfg():
  c = base().checkpoint
  c.async_save = False
  return c


def state(step):
  # "w" (4 KiB of noise) is above orbax's 1 KiB inline limit: it gets a chunk file.
  w = jax.random.normal(jax.random.key(step), (32, 32))
  return {"w": w, "step": jnp.array(step, jnp.int32)}


@pytest.fixture
def saved(tmp_path, monkeypatch):
  """A directory with checkpoints at steps 1 and 2."""
  monkeypatch.setattr(C, "RESTORE_BACKOFF_S", 0.0)
  ck = C.Checkpointer(tmp_path, cfg())
  for step in (1, 2):
    ck.save(step, state(step), {"pos": step}, {"eval/loss": 1.0}, wait=True)
  ck.close()
  return tmp_path


def restore(directory):
  """restore_latest as a restarted run calls it: (step, data position)."""
  ck = C.Checkpointer(directory, cfg())
  try:
    out = ck.restore_latest(C.abstract(state(0)))
    if out is None:
      return None
    step, restored, data = out
    np.testing.assert_array_equal(restored["w"], state(step)["w"])
    return step, data
  finally:
    ck.close()


def listing(directory):
  return sorted(p.name for p in Path(directory).iterdir())


def failing(monkeypatch, error, times=None):
  """Makes orbax's item reads raise `error` (the first `times` reads; all if None)."""
  calls, restore_items = [], ocp.CompositeCheckpointHandler.restore

  def restore_or_fail(self, directory, *args, **kwargs):
    calls.append(Path(directory).name)
    if times is None or len(calls) <= times:
      raise error
    return restore_items(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.CompositeCheckpointHandler, "restore", restore_or_fail)
  return calls


def test_transient_error_is_retried(saved, monkeypatch):
  calls = failing(monkeypatch, OSError(5, "Input/output error"), times=1)
  assert restore(saved) == (2, {"pos": 2})
  assert calls == ["2", "2"] and listing(saved) == ["1", "2"]


def test_persistent_transient_error_stops_with_the_checkpoint_in_place(saved, monkeypatch):
  calls = failing(monkeypatch, OSError(5, "Input/output error"))
  with pytest.raises(RuntimeError, match=r"step 2 could not be read \(OSError.*NOT set aside"):
    restore(saved)
  assert calls == ["2"] * C.RESTORE_TRIES and listing(saved) == ["1", "2"]
  monkeypatch.undo()
  assert restore(saved) == (2, {"pos": 2})


def test_restore_target_mismatch_is_a_config_error_at_once(saved, monkeypatch):
  # e.g. a changed model config: neither corruption (set aside) nor a read error (retried)
  calls = failing(monkeypatch, OSError(5, "Input/output error"))
  ck = C.Checkpointer(saved, cfg())
  target = C.abstract({**state(0), "w": jnp.zeros((16, 16)), "b": jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"step 2 .* not this run's state: 2 arrays differ, "
                     r"e.g. b: saved None, the run has \(3,\); w: saved \(32, 32\), the run "
                     r"has \(16, 16\)\. checkpoint.resume_changed=True resumes only"):
    ck.restore_latest(target)
  ck.close()
  assert calls == [] and listing(saved) == ["1", "2"]


def garble(f):
  f.write_bytes(b"\x00garbage\xff" * 8)


def truncate(f):
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def remove(f):
  shutil.rmtree(f) if f.is_dir() else f.unlink()


def empty(f):
  f.write_bytes(b"")


def overwrite_start(f):
  """The first bytes of a file overwritten (the issue's reproduction, on every file)."""
  f.write_bytes(b"\x96" * 8 + f.read_bytes()[8:])


def flip_a_bit(f):
  """One bit inside the array data: it still decodes, to other numbers."""
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))


def largest(directory):
  return [max(directory.rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else -1)]


# Every way a file can rot, in every file orbax writes, the metrics beside each
# checkpoint (orbax's manager reads them on opening the directory) included.
@pytest.mark.parametrize("pattern,damage", [
    ("state/_METADATA", garble), ("data/metadata", truncate), ("data/metadata", remove),
    ("state", remove), ("state/d/*", truncate), ("state/ocdbt.process_0/d/*", truncate),
    ("state/manifest.ocdbt", garble), ("state/manifest.ocdbt", empty),
    ("metrics/metrics", garble), ("metrics/metrics", truncate), ("metrics/metrics", empty),
    ("metrics", remove), ("_CHECKPOINT_METADATA", garble), ("_CHECKPOINT_METADATA", empty),
    ("state/array_metadatas/*", empty), (C.CHECKSUMS, truncate), ("**/*", overwrite_start),
    ("**/*", empty), (largest, flip_a_bit)])
def test_corrupt_newest_checkpoint_is_set_aside(saved, pattern, damage):
  files = pattern(saved / "2") if callable(pattern) else [
      f for f in (saved / "2").glob(pattern) if pattern != "**/*" or f.is_file()]
  assert files
  for f in files:
    damage(f)
  assert restore(saved) == (1, {"pos": 1})
  assert listing(saved) == ["1", "2.unreadable"]


def test_checksums_are_written_once_an_async_save_completes(tmp_path):
  c = cfg()
  c.async_save = True
  ck = C.Checkpointer(tmp_path, c)
  for step in (1, 2):  # the second save waits for the first, whose callback has run
    ck.save(step, state(step), {"pos": step}, {"eval/loss": 1.0})
  ck.close()
  for step in (1, 2):
    recorded = json.loads((tmp_path / str(step) / C.CHECKSUMS).read_text())
    files = {str(f.relative_to(tmp_path / str(step))) for f in (tmp_path / str(step)).rglob("*")
             if f.is_file()}
    # all but the checksums and orbax's commit time and marker, written after the callback
    assert set(recorded) == files - {C.CHECKSUMS, "_CHECKPOINT_METADATA", "commit_success.txt"}
    assert {"metrics/metrics", "data/metadata", "state/manifest.ocdbt"} <= set(recorded)
    assert recorded == C.checksums(tmp_path / str(step))


def test_an_older_checkpoint_whose_metrics_do_not_parse_is_set_aside(saved):
  garble(saved / "1" / "metrics" / "metrics")  # orbax's manager read it on opening: a crash
  assert restore(saved) == (2, {"pos": 2})
  assert listing(saved) == ["1.unreadable", "2"]


def test_the_same_step_set_aside_twice_gets_another_name(saved):
  for n in range(2):
    garble(saved / "2" / "state" / "_METADATA")
    assert restore(saved) == (1, {"pos": 1})
    ck = C.Checkpointer(saved, cfg())  # the run goes on and saves step 2 again
    ck.save(2, state(2), {"pos": 2}, wait=True)
    ck.close()
  assert listing(saved) == ["1", "2", "2.unreadable", "2.unreadable-2"]


@pytest.mark.parametrize("error,expected", [
    (json.JSONDecodeError("Expecting value", "", 0), True),
    (FileNotFoundError("File .../data/metadata not found."), True),
    (ValueError("DATA_LOSS: Error reading \"w/0.0\": Error decoding b-tree node"), True),
    (ValueError("UNAVAILABLE: Error reading \"w/0.0\""), False),
    (ValueError("FAILED_PRECONDITION: Error reading \"w/0.0\" [OS error 107: ENOTCONN "
                "Transport endpoint is not connected]"), False),
    (OSError(5, "Input/output error"), False), (TimeoutError(), False),
    (KeyError("tree_metadata"), False)])
def test_corrupt_classifies_errors(error, expected):
  assert C.corrupt(error) is expected
  wrapped = Exception("Encountered error while reading array index")
  wrapped.__cause__ = error  # how orbax wraps tensorstore's errors
  assert C.corrupt(wrapped) is expected


@pytest.mark.parametrize("others,verdict", [([0], 0), ([1], 1), ([2, 1], 2)])
def test_agree_takes_the_worst_verdict(monkeypatch, others, verdict):
  monkeypatch.setattr(C.jax, "process_count", lambda: 1 + len(others))
  monkeypatch.setattr(C.multihost_utils, "process_allgather",
                      lambda x: np.array([x, *others], np.int32))
  assert C.agree(C.OK) == verdict


def other_process_says(monkeypatch, other):
  """Another process's verdict on each step, the worse one winning (as `agree` does)."""
  monkeypatch.setattr(C, "agree", lambda mine: max(mine, other))


def test_mismatch_elsewhere_is_a_config_error_here_too(saved, monkeypatch):
  other_process_says(monkeypatch, C.MISMATCH)
  with pytest.raises(ValueError, match="step 2 .* not this run's state: a read error on another"):
    restore(saved)
  assert listing(saved) == ["1", "2"]


def test_corrupt_elsewhere_sets_aside_here_too(saved, monkeypatch):
  other_process_says(monkeypatch, C.CORRUPT)
  assert restore(saved) is None  # every step, as every step is corrupt on the other
  assert listing(saved) == ["1.unreadable", "2.unreadable"]


def test_transient_elsewhere_stops_here_too(saved, monkeypatch):
  other_process_says(monkeypatch, C.TRANSIENT)
  with pytest.raises(RuntimeError, match="step 2 could not be read .a read error on another"):
    restore(saved)
  assert listing(saved) == ["1", "2"]


def test_corrupt_here_wins_over_transient_elsewhere(saved, monkeypatch):
  other_process_says(monkeypatch, C.TRANSIENT)
  garble(saved / "2" / "state" / "_METADATA")
  with pytest.raises(RuntimeError, match="step 1 could not be read"):
    restore(saved)  # 2 set aside; then 1 fails on the other process
  assert listing(saved) == ["1", "2.unreadable"]


WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, fault, directory = sys.argv[1:]
jax.distributed.initialize(f"localhost:{port}", 2, int(pid))
from pathlib import Path
import orbax.checkpoint as ocp
sys.path.insert(0, "tests")
import test_checkpoint as T
C = T.C
C.RESTORE_BACKOFF_S = 0.05
restore_items = ocp.CompositeCheckpointHandler.restore

def restore_or_fail(self, directory, *args, **kwargs):
  if Path(directory).name == "2":
    raise OSError(5, "Input/output error") if fault == "transient" else json.JSONDecodeError("x", "", 0)
  return restore_items(self, directory, *args, **kwargs)

if pid == "1":  # only the second process sees the fault
  ocp.CompositeCheckpointHandler.restore = restore_or_fail
try:
  print("RESULT", json.dumps(T.restore(directory)))
except RuntimeError as e:
  print("RESULT", json.dumps(str(e)))
"""


@pytest.mark.parametrize("fault", ["transient", "corrupt"])
def test_two_processes_take_the_same_branch(saved, fault):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  root = Path(__file__).resolve().parents[1]
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), fault, str(saved)],
                            cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  results = [json.loads(out.split("RESULT ")[-1]) if "RESULT " in out else out[-2000:]
             for out in outs]
  if fault == "transient":
    assert "step 2 could not be read (a read error on another process" in results[0], results
    assert "step 2 could not be read (OSError" in results[1], results
    assert listing(saved) == ["1", "2"]
  else:
    assert results == [[1, {"pos": 1}]] * 2, results
    assert listing(saved) == ["1", "2.unreadable"]
