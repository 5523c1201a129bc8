"""Selective copying (Mamba paper, section 4.1.1 and Table 1): Mamba against
Transformer++ and the hybrid, all at two layers of width 64 as the paper's models.

  ssm-compare --config configs/compare/selective_copy.py --workdir runs/compare-sc
  ssm-compare --config configs/compare/selective_copy.py:paper

CPU: length 64 with 4 tokens to copy (4 data tokens among 56 noise tokens, then 4
markers), vocabulary 16. The paper's setting: length 4096, 16 tokens to copy, 400K
steps at a constant learning rate of 1e-4, batch 64 (Table 1: Mamba 99.8%, S4 18.3%,
H3 57.0%, Hyena 30.1%).
"""

import ml_collections as mlc

from ssm.compare import comparison


def get_config(setting="cpu"):
  c = mlc.ConfigDict()
  c.name = "selective-copy"
  c.base = "configs/selective_copy.py:mamba"
  c.families = ("mamba", "transformer++", "hybrid")
  c.reference = mlc.ConfigDict(dict(family="mamba", n_layer=2))
  c.sizes = (64,)
  c.same_depth = True
  c.match = "width"  # Table 1 compares every model at two layers of width 64
  c.tolerance = 0.02
  c.seq_lens = ()
  c.seeds = (0,)
  # per family: Mamba learns the task fast at 1e-2; attention is swept lower
  c.lrs = mlc.ConfigDict({"mamba": (1e-2,), "transformer++": (1e-3, 3e-3),
                          "hybrid": (3e-3, 1e-2)})
  c.select = mlc.ConfigDict(dict(metric="eval_accuracy", mode="max"))
  c.overrides = mlc.ConfigDict(dict(
      train=dict(steps=2000, eval_steps=2),
      checkpoint=dict(every=500)))
  c.paper = (
      "Table 1 (length 4096, 16 tokens to copy, vocabulary 16; 2 layers, width 64; "
      "400K steps at 1e-4): Mamba (S6) 99.8%, H3 with S6 99.7%, S6 without gating 97.0%; "
      "S4 18.3-57.0%, Hyena 28.4-30.1%. Table 1 has no attention baseline.")
  if setting == "paper":
    c.lrs = mlc.ConfigDict({family: (1e-4,) for family in c.families})
    c.overrides.task = mlc.ConfigDict(dict(seq_len=4096, num_tokens_to_copy=16))
    c.overrides.train.update(steps=400_000, batch_size=64, schedule="constant", warmup_steps=0,
                             eval_every=10_000, stop_when="")
    c.overrides.checkpoint.every = 10_000
  elif setting != "cpu":
    raise ValueError(f"configs/compare/selective_copy.py:{setting}: expected 'cpu' or 'paper'")
  c.wandb_mode = "auto"
  c.parallel = 2
  return comparison(c)
