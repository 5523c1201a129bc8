"""MQAR (Zoology's multi-query associative recall) with a Mamba, attention,
Transformer++ or hybrid model, small enough to train on a 2-core CPU in minutes.

  ssm-train --config configs/mqar.py:attention --workdir runs/mqar-attn
  ssm-train --config configs/mqar.py:transformer --workdir runs/mqar-tpp
  ssm-train --config configs/mqar.py:hybrid --workdir runs/mqar-hybrid
  ssm-train --config configs/mqar.py:mamba --workdir runs/mqar-mamba
  ssm-train --config configs/mqar.py:mamba2 --workdir runs/mqar-mamba2

`attention` is Zoology's attention baseline (one head, blocks without MLPs, as all of
Zoology's MQAR models); `transformer` is Transformer++ (four heads and a SwiGLU MLP).
Runs stop once eval accuracy reaches 0.99, Zoology's rule (train.stop_when).

The CPU operating point (docs/results/synthetic-audit.md): length 64 as Zoology's
shortest, with 8 key-value pairs rather than its 4, a vocabulary of 64 rather than
8192, batches of 64. Recall is learnt by a sudden transition whose arrival is counted
in supervised queries: twice the pairs per row bring it about 2.5x sooner, and
batches of 32 at 4 pairs never reach it in 2,000 steps.

Zoology's setting is one override away: --config.task.vocab_size=8192
--config.model.vocab_size=8192 --config.task.num_kv_pairs=0 --config.task.seq_len=256
(0 pairs: Zoology's count for the length, 4, 8, 16 or 64 at 64, 128, 256 or 512).
"""

from ssm.config import base, lock, small_lm, task_config


def get_config(arch="mamba"):
  c = base()
  c.task = task_config("mqar", vocab_size=64, seq_len=64, num_kv_pairs=8, power_a=0.01,
                       random_non_queries=False)  # as Zoology's Figure 2
  c.model = small_lm(arch, 64, "configs/mqar.py")
  c.train.steps = 3000
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
