"""MQAR accuracy against model width: attention vs Mamba vs a hybrid, as Zoology's
Figure 2 (Arora et al. 2023). The README's main job, CPU-sized:

  ssm-compare --config configs/compare/mqar.py --workdir runs/compare-mqar

With Mamba-2 (the official mixer, family "mamba2"; not in the default families, to keep
the main job short): --config.families="('attention','mamba','hybrid','mamba2')"

Every family at the reference widths (`match="width"`, Zoology's x axis; "params" or
"flops" match them instead), two layers of sequence mixers without MLPs (Zoology's
blocks; `attention` is RoPE attention with one head), a learning-rate sweep per family
and two seeds, each run trained until eval accuracy reaches 0.99 (Zoology's stopping
rule) or for 20,480 examples (640 steps of 32). The task is configs/mqar.py's CPU operating point:
length 64 with 8 key-value pairs, vocabulary 64 (docs/results/synthetic-audit.md).

The paper's setting (vocab 8192, lengths 64-512 with 4-64 pairs, widths 64-512,
Zoology's learning rates, up to 64 epochs of 100k examples at batch 512) wants a GPU:
  ssm-compare --config configs/compare/mqar.py:paper
"""

import ml_collections as mlc

from ssm.compare import comparison


def get_config(setting="cpu"):
  c = mlc.ConfigDict()
  c.name = "mqar"
  c.base = "configs/mqar.py:mamba"  # the task, training and logging settings of each run
  c.families = ("attention", "mamba", "hybrid")
  c.reference = mlc.ConfigDict(dict(family="mamba", n_layer=2))
  c.sizes = (64, 96)  # reference widths (Zoology's: 64 to 512)
  c.same_depth = True  # with match params / flops: every family at the reference's depth
  c.match = "width"  # or "params", "flops" (training FLOPs per token at the task's length)
  c.tolerance = 0.05  # for params / flops: one-head attention without MLPs steps coarsely
  # (on FLOPs at width 96 the closest is 3% off)
  c.seq_lens = ()  # task lengths to sweep, e.g. (64, 128, 256): one panel each
  c.seeds = (0, 1)
  # per family (one sweep here; the paper setting's is Zoology's); attention does not
  # learn recall at 1e-2, and wider attention wants a lower rate (synthetic-audit.md)
  c.lrs = mlc.ConfigDict({"attention": (1e-3, 3e-3), "hybrid": (1e-3, 3e-3),
                          "mamba": (1e-3, 3e-3), "mamba2": (1e-3, 3e-3)})
  c.lr_sweep = "first_seed"  # the rates swept at seed 0; seed 1 at the best ("every_seed")
  c.select = mlc.ConfigDict(dict(metric="eval_accuracy", mode="max"))  # picks the best lr
  # applied to every run's config (the keys of configs/mqar.py)
  c.overrides = mlc.ConfigDict(dict(
      # a constant rate after warmup: the step cap must not decay it (synthetic-audit.md)
      train=dict(steps=640, batch_size=32, schedule="constant", log_every=40, eval_every=40,
                 eval_steps=2),
      checkpoint=dict(every=640)))  # at the end: a killed run of a few minutes restarts
  c.paper = (
      "Zoology's Figure 2 (vocab 8192; (length, pairs) = (64, 4) .. (512, 64); two layers; "
      "the best of four learning rates): attention solves MQAR, accuracy about 1.0, at "
      "every width from 64 to 512 and every length; the gated convolutions (H3, Hyena, "
      "RWKV, BaseConv) need widths that grow with the length. Zoology's figure has no "
      "Mamba curve (its sweep ran Mamba, the figure does not show it).")
  if setting == "paper":
    c.sizes = (64, 128, 256, 512)
    c.seq_lens = (64, 128, 256, 512)  # with Zoology's pairs 4, 8, 16, 64
    c.seeds = (0,)
    zoology_lrs = (1e-4, 4.6e-4, 2.2e-3, 1e-2)  # np.logspace(-4, -2, 4)
    c.lrs = mlc.ConfigDict({family: zoology_lrs for family in (*c.families, "mamba2")})
    c.overrides.task = mlc.ConfigDict(dict(vocab_size=8192, num_kv_pairs=0))
    c.overrides.model = mlc.ConfigDict(dict(vocab_size=8192))
    # 64 epochs of 100k examples at batch 512 is 12.5k steps; Zoology decays the
    # learning rate to 0 by cosine, without warmup or clipping, and evaluates on 3k
    # examples. ssm draws fresh examples every step rather than cycling 100k.
    c.overrides.train.update(steps=12_500, batch_size=512, schedule="cosine", warmup_steps=0,
                             clip_norm=0.0, min_lr_ratio=0.0, eval_every=500, eval_steps=6)
    c.overrides.checkpoint.every = 500
  elif setting != "cpu":
    raise ValueError(f"configs/compare/mqar.py:{setting}: expected 'cpu' or 'paper'")
  c.wandb_mode = "auto"
  c.parallel = 2  # runs at a time, each on its share of the devices (GPUs) or cores (CPU)
  return comparison(c)
