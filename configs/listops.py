"""ListOps (Long Range Arena) as a causal LM task with a Mamba, Transformer++ or hybrid
model: the prefix expression, then its value (a digit token) predicted at its last
token. Small enough to train on a 2-core CPU in a few minutes: expressions of 9 to
63 tokens (max_depth 10, up to 10 arguments per operator), seq_len 64.

  ssm-train --config configs/listops.py:mamba --workdir runs/listops-mamba
  ssm-train --config configs/listops.py:transformer --workdir runs/listops-tpp
  ssm-train --config configs/listops.py:hybrid --workdir runs/listops-hybrid

LRA's setting (the generator's max_depth 10, max_args 10, 500 < length < 2000,
inputs padded to 2000; its Transformer baseline: 6 layers, width 512, 8 heads, MLP
2048, batch 32, 5000 steps, 1000 warmup steps to lr 0.05 / sqrt(1000) = 1.6e-3 then
rsqrt decay, weight decay 0.1) is one override away:
  --config.task.min_length=500 --config.task.max_length=2000 --config.task.seq_len=2000
  --config.model.d_model=512 --config.model.n_layer=6 --config.model.attention.n_heads=8
  --config.model.d_intermediate=2048 --config.train.steps=5000 --config.train.lr=1.6e-3
  --config.train.warmup_steps=1000
(LRA reads a [CLS]-pooled encoder; here the answer is predicted causally after the
whole expression, so the numbers are not directly comparable to LRA's table.)
"""

from ssm.config import base, lock, small_lm, task_config


def get_config(arch="mamba"):
  c = base()
  c.task = task_config("listops", vocab_size=16, seq_len=64, max_depth=10, max_args=10,
                       min_length=8, max_length=64)
  c.model = small_lm(arch, 16, "configs/listops.py")
  c.train.steps = 600
  c.train.batch_size = 32
  c.train.lr = 3e-3
  c.train.warmup_steps = 20
  c.train.log_every = 20
  c.train.eval_every = 100
  c.checkpoint.every = 100
  c.wandb.group = "listops"
  c.wandb.job_type = arch
  return lock(c)
