"""ViT, ViT with registers, Vision Mamba and Vision Mamba with registers, matched on
parameters to a reference ViT, on Fashion-MNIST (Debian's dataset-fashion-mnist
files) at CPU size, trained to convergence:

  ssm-compare --config configs/compare/images.py --workdir runs/compare-images

The reference is a ViT of width 40 and 3 layers (MLP 4x) on 7x7 patches of the 28x28
images (a 4x4 grid: 16 patches, 17 tokens, 21 with the 4 registers of "Vision
Transformers Need Registers"); the other families are matched to its parameters within
2% (ssm.flops.match_vision: Vision Mamba comes out 40 wide and 3 deep). Converged on a
2-core CPU in under 10 minutes means data-limited: the first 3,000 training images, no
augmentation, 1,000 steps of 32 (about 11 epochs), where every family has reached its
plateau (twice the steps gives no better test accuracy: docs/results/compare-images/).
The full 60,000 images at this size would want hours (a Vim step is about 4x a ViT's on
CPU). Evaluated on 9,984 of the 10,000 test images. Two learning rates at seed 0, seed 1
at the better one.

One override away (the data must be on disk: tfds' ArrayRecord files):
  ssm-compare --config configs/compare/images.py:cifar10     # 32x32, 4x4 patches, GPU-sized
  ssm-compare --config configs/compare/images.py:paper       # ImageNet: ViT-S/16 vs Vim-S, the papers' scale
and the match on training FLOPs per image instead: --config.match=flops; the whole
training set: --config.overrides.task.train_split=train (and more steps).
"""

import ml_collections as mlc

from ssm.compare import comparison

FAMILIES = ("vit", "vit+reg", "vim", "vim+reg")


def get_config(setting="cpu"):
  c = mlc.ConfigDict()
  c.name = "images"
  c.base = "configs/images.py:vit"  # the task, training and logging settings of each run
  c.families = FAMILIES
  c.reference = mlc.ConfigDict(dict(family="vit", n_layer=3))
  c.sizes = (40,)  # reference widths
  c.same_depth = False  # Vision Mamba matches at its own depth
  c.match = "params"  # or "flops" (training FLOPs per image), "width"
  c.tolerance = 0.02
  c.seq_lens = ()
  c.seeds = (0, 1)
  c.lrs = (1e-3, 3e-3)  # every family; AdamW with warmup and cosine decay
  c.lr_sweep = "first_seed"  # the rates swept at seed 0; seed 1 at the better one
  c.select = mlc.ConfigDict(dict(metric="eval_accuracy", mode="max"))
  c.overrides = mlc.ConfigDict(dict(
      task=dict(train_split="train[:3000]", crop_padding=0, flip=False),
      model=dict(patch_size=7),
      train=dict(steps=1000, batch_size=32, warmup_steps=100, log_every=100, eval_every=500,
                 eval_steps=312),  # 9,984 test images per evaluation
      checkpoint=dict(every=1000)))
  c.paper = (
      "Darcet et al. (ICLR 2024): at ViT-B/L scale, 4 registers leave ImageNet accuracy about "
      "unchanged and remove the high-norm artifact tokens from the attention maps; Vim (Zhu et "
      "al. 2024) and Mamba-R (Wang et al. 2024) report Vision Mamba at DeiT's accuracy at "
      "matched size, registers adding a little. None of it is claimed at this size.")
  if setting == "cifar10":
    c.sizes = (192,)
    c.reference.n_layer = 6
    c.seeds = (0, 1)
    c.overrides.task = mlc.ConfigDict(dict(dataset="cifar10", path="", crop_padding=4))
    c.overrides.model.update(image_size=32, patch_size=4, channels=3, num_classes=10)
    c.overrides.train.update(steps=20_000, batch_size=128, warmup_steps=1_000, eval_every=2_000,
                             eval_steps=80)  # the 10k test images
    c.overrides.checkpoint.every = 2_000
  elif setting == "paper":  # ImageNet
    c.sizes = (384,)  # ViT-S/16: 384 wide, 12 layers, 6 heads, 22M parameters
    c.reference.n_layer = 12
    c.seeds = (0,)
    c.lrs = (1e-3, 3e-3)
    c.overrides.task = mlc.ConfigDict(dict(dataset="imagenet2012", path="", image_size=224))
    c.overrides.model.update(image_size=224, patch_size=16, channels=3, num_classes=1000)
    c.overrides.train.update(steps=500_000, batch_size=2048, warmup_steps=10_000,
                             eval_every=10_000, eval_steps=25)  # the 50k validation images
    c.overrides.checkpoint.every = 10_000
  elif setting != "cpu":  # Fashion-MNIST
    raise ValueError(f"configs/compare/images.py:{setting}: expected 'cpu', 'cifar10' or "
                     "'paper' (ImageNet)")
  c.wandb_mode = "auto"
  c.parallel = 2  # runs at a time, each on its share of the devices (GPUs) or cores (CPU)
  return comparison(c)
