"""MQAR accuracy against model width: attention vs Mamba vs a hybrid, as Zoology's
Figure 2 (Arora et al. 2023). The README's main job, CPU-sized:

  ssm-compare --config configs/compare/mqar.py --workdir runs/compare-mqar

Every family at the reference widths (`match="width"`, Zoology's x axis; "params" or
"flops" match them instead), two layers of sequence mixers without MLPs (Zoology's
blocks: `attention` is RoPE attention alone, not Transformer++, whose SwiGLU MLP
delays the recall circuit far past this budget; docs/results/synthetic-audit.md),
a small learning-rate sweep and two seeds, each run trained until eval accuracy
reaches 0.99 (Zoology's stopping rule) or eval loss stops improving.

The paper's setting (vocab 8192, lengths 64-512 with 4-64 pairs, widths 64-512,
Zoology's learning rates, up to 64 epochs of 100k examples at batch 512) wants a GPU:
  ssm-compare --config configs/compare/mqar.py:paper
"""

import ml_collections as mlc


def get_config(setting="cpu"):
  c = mlc.ConfigDict()
  c.name = "mqar"
  c.base = "configs/mqar.py:mamba"  # the task, training and logging settings of each run
  c.families = ("attention", "mamba", "hybrid")
  c.reference = mlc.ConfigDict(dict(family="mamba", n_layer=2))
  c.sizes = (32, 64)  # reference widths
  c.same_depth = True  # with match params / flops: every family at the reference's depth
  c.match = "width"  # or "params", "flops" (training FLOPs per token at the task's length)
  c.tolerance = 0.02
  c.seq_lens = ()  # task lengths to sweep, e.g. (64, 128, 256): one panel each
  c.seeds = (0, 1)
  c.lrs = (3e-3, 1e-2)
  c.select = mlc.ConfigDict(dict(metric="eval_accuracy", mode="max"))  # picks the best lr
  # applied to every run's config (the keys of configs/mqar.py)
  c.overrides = mlc.ConfigDict(dict(
      task=dict(seq_len=64, num_kv_pairs=0, vocab_size=256),
      model=dict(vocab_size=256),
      train=dict(steps=800, batch_size=32, warmup_steps=50, log_every=50, eval_every=100,
                 eval_steps=2, stop_when="eval/accuracy>=0.99", patience=3),
      checkpoint=dict(every=500)))
  if setting == "paper":
    c.sizes = (64, 128, 256, 512)
    c.seq_lens = (64, 128, 256, 512)  # with Zoology's pairs 4, 8, 16, 64
    c.seeds = (0,)
    c.lrs = (1e-4, 4.6e-4, 2.2e-3, 1e-2)  # np.logspace(-4, -2, 4)
    c.overrides.task.vocab_size = c.overrides.model.vocab_size = 8192
    # 64 epochs of 100k examples at batch 512 is 12.5k steps; Zoology decays the
    # learning rate to 0 by cosine, without warmup or clipping, and evaluates on 3k
    # examples. ssm draws fresh examples every step rather than cycling 100k.
    c.overrides.train.update(steps=12_500, batch_size=512, warmup_steps=0, clip_norm=0.0,
                             min_lr_ratio=0.0, eval_every=500, eval_steps=6, patience=0)
  elif setting != "cpu":
    raise ValueError(f"configs/compare/mqar.py:{setting}: expected 'cpu' or 'paper'")
  c.wandb_mode = "auto"
  c.parallel = 2  # runs at a time, each on its share of the devices (GPUs) or cores (CPU)
  return c
