"""MQAR (Zoology's multi-query associative recall) with a Mamba, attention,
Transformer++ or hybrid model, small enough to train on a 2-core CPU in minutes.

  ssm-train --config configs/mqar.py:attention --workdir runs/mqar-attn
  ssm-train --config configs/mqar.py:mamba --workdir runs/mqar-mamba
  ssm-train --config configs/mqar.py:transformer --workdir runs/mqar-tpp
  ssm-train --config configs/mqar.py:hybrid --workdir runs/mqar-hybrid

`attention` is Zoology's attention baseline (blocks without MLPs, as all of
Zoology's MQAR models); `transformer` is Transformer++ (with its SwiGLU MLP), which
learns the task far later (docs/results/synthetic-audit.md). Runs stop once eval
accuracy reaches 0.99, Zoology's rule (train.stop_when).

Zoology's setting is one override away: --config.task.vocab_size=8192
--config.model.vocab_size=8192 --config.task.seq_len=256 (64, 128, 256 or 512: the
number of key-value pairs follows Zoology, 4, 8, 16 or 64, unless
--config.task.num_kv_pairs sets it).
"""

from ssm.train.config import base, lock, small_lm


def get_config(arch="mamba"):
  c = base()
  c.task.name = "mqar"
  c.task.vocab_size = 256
  c.task.seq_len = 64
  c.task.num_kv_pairs = 0  # Zoology's count for seq_len: 4 at 64
  c.task.power_a = 0.01
  c.task.random_non_queries = False  # as Zoology's Figure 2
  c.model = small_lm(arch, 256, "configs/mqar.py")
  c.train.steps = 2000
  c.train.batch_size = 64
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.train.log_every = 50
  c.train.eval_every = 100
  c.train.stop_when = "eval/accuracy>=0.99"
  c.checkpoint.every = 500
  c.wandb.group = "mqar"
  c.wandb.job_type = arch
  return lock(c)
