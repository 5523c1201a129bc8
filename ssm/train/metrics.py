"""Where metrics go: a JSON-lines file in the workdir, Weights & Biases (online,
offline or disabled), and a console progress bar with ETA."""

import json
import logging
import os
import uuid
from pathlib import Path

import jax
import tqdm

log = logging.getLogger("ssm.train")

# Peak dense bf16 FLOP/s per device, for MFU; `train.peak_flops_per_device` overrides.
# The first name found in the device kind wins (so "H100 PCIe" before "H100").
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def setup_logging():
  """ssm's messages at INFO; everything else (orbax logs every save at INFO) at WARNING."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("ssm").setLevel(logging.INFO)
  # JAX tries every platform it knows at start; on a machine without a TPU that is noise.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def peak_flops(override=0.0):
  if override:
    return override
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), 0.0)


WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_mode(mode):
  """The mode wandb.init gets: `mode` unless "auto"; for "auto" W&B's own WANDB_MODE
  where set (e.g. WANDB_MODE=disabled), else online when credentials exist."""
  if mode != "auto":
    return mode
  env = os.environ.get("WANDB_MODE", "")
  if env:
    env = {"dryrun": "offline", "run": "online"}.get(env, env)  # wandb's older names
    if env not in WANDB_MODES[1:]:
      raise ValueError(f"WANDB_MODE={os.environ['WANDB_MODE']!r}: expected one of "
                       f"{', '.join(WANDB_MODES[1:])} (or unset it)")
    return env
  netrc = Path.home() / ".netrc"
  online = os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in
                                                netrc.read_text())
  return "online" if online else "offline"


# Rows of metrics.jsonl past the step a run resumed from (after a crash, or a
# checkpoint set aside), each with "resumed_from": that step.
SUPERSEDED = "metrics.superseded.jsonl"


class MetricsWriter:
  """Writes on process 0 only. On resume the JSON-lines file keeps the rows up to
  the restored step, so that the file reads as one uninterrupted run; the rows after
  it, which the resumed run measures again, move to SUPERSEDED."""

  def __init__(self, workdir, cfg, run_config, start_step, total_steps):
    """`cfg`: the wandb config (mode online / offline / disabled / auto: online when
    credentials exist); the run id is kept in the workdir so a resumed run goes on."""
    self.main = jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self.wandb = None
    bar = lambda: tqdm.tqdm(total=total_steps, initial=start_step, disable=not self.main,
                            dynamic_ncols=True, mininterval=2.0, desc="train")
    if not self.main:
      self.bar = bar()
      return
    if self.path.exists():
      rows = [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]
      later = [r for r in rows if r["step"] > start_step]
      if later:  # measured past the checkpoint resumed from: kept aside, never lost
        with self.path.with_name(SUPERSEDED).open("a") as f:
          f.writelines(json.dumps({**r, "resumed_from": start_step}) + "\n" for r in later)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows
                                     if r["step"] <= start_step))
    mode = wandb_mode(cfg.mode)
    if mode != "disabled":
      import wandb
      id_file = Path(workdir) / "wandb_id"
      run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
      id_file.write_text(run_id)
      self.wandb = wandb.init(
          project=cfg.project, entity=cfg.entity or None, group=cfg.group or None,
          job_type=cfg.job_type or None, name=cfg.name or None, tags=list(cfg.tags) or None,
          mode=mode, dir=str(workdir), id=run_id, resume="allow", config=run_config,
          settings=wandb.Settings(silent=True))  # its banner and summary: one line below
      where = self.wandb.dir if mode == "offline" else self.wandb.url
      log.info("W&B %s run %s: %s%s", mode, run_id, where,
               f" (upload: wandb sync {Path(self.wandb.dir).parent})" if mode == "offline" else "")
    self.bar = bar()  # after that line, which would otherwise run into the bar

  def write(self, step, metrics):
    if not self.main:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    if self.wandb is not None:
      self.wandb.log(metrics, step=step)
    self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()
                          if k in ("loss", "accuracy", "bits_per_byte", "eval/loss",
                                   "eval/accuracy", "eval/bits_per_byte")},
                         refresh=False)

  def advance(self):
    self.bar.update(1)

  def summary(self, values):
    if self.wandb is not None:
      self.wandb.summary.update({k: float(v) for k, v in values.items()})

  def close(self):
    self.bar.close()
    if self.wandb is not None:
      self.wandb.finish()
