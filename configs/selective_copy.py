"""Selective copying (Mamba paper, section 4.1.1) with a Mamba, Transformer++ or
hybrid model, small enough to train on a 2-core CPU in a few minutes: 4 data tokens
among 56 noise tokens, then 4 markers (seq_len 64 = 56 + 2 x 4), vocab 16 (noise 0,
data 1..14, marker 15).

  ssm-train --config configs/selective_copy.py:mamba --workdir runs/sc-mamba
  ssm-train --config configs/selective_copy.py:transformer --workdir runs/sc-tpp
  ssm-train --config configs/selective_copy.py:hybrid --workdir runs/sc-hybrid

The model is already the paper's (2 layers, d_model 64). The paper's setting (appendix
E.1: length 4096, vocab 16, 16 data tokens; 400K steps at a constant learning rate
of 1e-4, batch 64) is one override away:
  --config.task.seq_len=4096 --config.task.num_tokens_to_copy=16
  --config.train.steps=400000 --config.train.batch_size=64 --config.train.lr=1e-4
  --config.train.schedule=constant --config.train.warmup_steps=0
(seq_len counts the 16 markers too; S4's generator, which the paper's code used,
calls L the noise alone: for L = 4096 use seq_len 4128.)
"""

from ssm.config import base, lock, small_lm, task_config


def get_config(arch="mamba"):
  c = base()
  c.task = task_config("selective_copy", vocab_size=16, seq_len=64, num_tokens_to_copy=4)
  c.model = small_lm(arch, 16, "configs/selective_copy.py")
  c.train.steps = 2000  # Mamba stops at 0.99 after about 1,250 (docs/results/tasks.md)
  c.train.batch_size = 32
  c.train.lr = 1e-2
  c.train.warmup_steps = 20
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.stop_when = "eval/accuracy>=0.99"
  c.checkpoint.every = 250
  c.wandb.group = "selective_copy"
  c.wandb.job_type = arch
  return lock(c)
