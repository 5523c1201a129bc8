"""ssm-train --config configs/<task>.py:<arch> --workdir DIR [--config.key=value ...]"""

import sys

from absl import flags
from ml_collections import config_flags

from ssm.config import command
from ssm.train.loop import NonFiniteLoss, Stopped, train
from ssm.train.metrics import setup_logging

USAGE = """
ssm-train: trains (or resumes) one run through the shared loop.

  ssm-train --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]

  ssm-train --config configs/mqar.py:mamba --workdir runs/mqar-mamba
  ssm-train --config configs/bytes.py:hybrid --workdir runs/b --config.train.steps=2000 \\
            --config.model.d_model=256 --config.mesh.fsdp=2

--config  a config file and the argument its get_config(ARG) takes (configs/*.py: mqar,
          induction_heads, selective_copy, listops, bytes, images; ARG the model)
--workdir where everything goes: config.json, run.json (parameters, FLOPs),
          metrics.jsonl, checkpoints/, wandb/; rerunning the same command resumes from
          its newest checkpoint. SIGTERM or Ctrl-C saves a checkpoint and stops (a
          second Ctrl-C stops at once, without saving).

Exit status: 0 trained to train.steps (or stopped early by train.stop_when /
  train.patience, or already complete); 75 stopped by SIGTERM or Ctrl-C with a
  checkpoint saved: rerun to resume (schedulers can requeue on 75: EX_TEMPFAIL; see
  scripts/slurm_train.sh); 2 a config or workdir that cannot run (the message says
  what to change); 3 the loss became NaN or inf; 130 a second Ctrl-C, or one before
  training started (nothing saved).

Any key of the config is an override, --config.SECTION.KEY=VALUE; the main ones:
  train.steps, train.batch_size, train.lr, train.schedule (cosine | constant),
  train.warmup_steps, train.grad_accum, train.eval_every, train.stop_when
  model.d_model, model.n_layer, model.pattern (M: Mamba, A: attention, e.g. MMA),
  model.dtype (float32 | bfloat16), model.mamba.d_state, model.mamba.scan_impl
  task.* (the task's fields: task.seq_len, task.vocab_size, ...)
  mesh.data, mesh.fsdp, mesh.tensor (one may be -1: the rest of the devices)
  checkpoint.every, checkpoint.keep, wandb.mode (online | offline | disabled | auto)
Every key and its default: python -c "from ssm.config import load_config_file; \\
  print(load_config_file('configs/mqar.py:mamba'))"
"""

STOPPED = 75  # EX_TEMPFAIL: stopped with a checkpoint by a signal; rerun (requeue) to resume

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<task>.py:<arch>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go")


def _main(argv):
  del argv
  setup_logging()
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except Stopped as e:
    print(f"ssm-train: {e}", file=sys.stderr)
    sys.exit(STOPPED)
  except KeyboardInterrupt:
    print("ssm-train: stopped by Ctrl-C, without saving; rerunning the same command "
          "resumes from the newest checkpoint, if there is one", file=sys.stderr)
    sys.exit(130)
  except NonFiniteLoss as e:
    print(f"ssm-train: {e}", file=sys.stderr)
    sys.exit(3)
  except ValueError as e:  # a config that cannot run: its message says what to change
    print(f"ssm-train: {e}", file=sys.stderr)
    sys.exit(2)


def main():
  flags.mark_flags_as_required(["config", "workdir"])
  command("ssm-train", USAGE, _main)


if __name__ == "__main__":
  main()
