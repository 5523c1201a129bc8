"""Selective copying (Mamba paper, section 4.1.1 and Table 1): Mamba against
Transformer++ and the hybrid, matched on parameters.

  ssm-compare --config configs/compare/selective_copy.py --workdir runs/compare-sc
  ssm-compare --config configs/compare/selective_copy.py:paper

CPU: length 64 with 4 tokens to copy, vocabulary 16. The paper's setting: length
4096, 16 tokens to copy, 400K steps at a constant learning rate of 1e-4, batch 64
(Table 1: Mamba 99.8%, S4 18.3%, H3 57.0%, Hyena 30.1%).
"""

import ml_collections as mlc


def get_config(setting="cpu"):
  c = mlc.ConfigDict()
  c.name = "selective-copy"
  c.base = "configs/selective_copy.py:mamba"
  c.families = ("mamba", "transformer++", "hybrid")
  c.reference = mlc.ConfigDict(dict(family="mamba", n_layer=2))
  c.sizes = (64,)
  c.same_depth = True
  c.match = "params"
  c.tolerance = 0.02
  c.seq_lens = ()
  c.seeds = (0,)
  c.lrs = (3e-3,)
  c.select = mlc.ConfigDict(dict(metric="eval_accuracy", mode="max"))
  c.overrides = mlc.ConfigDict(dict(
      train=dict(steps=2000, batch_size=32, schedule="constant", warmup_steps=20,
                 log_every=50, eval_every=250, eval_steps=2, stop_when="eval/accuracy>=0.99"),
      checkpoint=dict(every=500)))
  if setting == "paper":
    c.lrs = (1e-4,)
    c.overrides.task = mlc.ConfigDict(dict(seq_len=4096, num_tokens_to_copy=16))
    c.overrides.train.update(steps=400_000, batch_size=64, warmup_steps=0,
                             eval_every=10_000, stop_when="")
    c.overrides.checkpoint.every = 10_000
  elif setting != "cpu":
    raise ValueError(f"configs/compare/selective_copy.py:{setting}: expected 'cpu' or 'paper'")
  c.wandb_mode = "auto"
  c.parallel = 1
  return c
