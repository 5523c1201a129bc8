"""Image classification with a ViT with registers or a Vision Mamba, and the same
images as pixel sequences for language models (sequential MNIST / CIFAR, the classic
long-range SSM benchmark). By default Fashion-MNIST from Debian's local files
(`apt-get install dataset-fashion-mnist`) and models small enough for a 2-core CPU:

  ssm-train --config configs/images.py:vit_reg4 --workdir runs/fmnist-vit
  ssm-train --config configs/images.py:vit --workdir runs/fmnist-vit-noreg
  ssm-train --config configs/images.py:vim --workdir runs/fmnist-vim
  ssm-train --config configs/images.py:mamba_seq --workdir runs/fmnist-seq

From tfds instead (read as ArrayRecord without TensorFlow): --config.task.path=
--config.task.dataset=cifar10 --config.model.image_size=32 --config.model.channels=3
(mnist, fashion_mnist, cifar10, and imagenet2012 once prepared from its manual
files, with --config.task.image_size=224).

Paper settings: ViT-S/16 with 4 registers on ImageNet ("Vision Transformers Need
Registers", DeiT-III recipe): --config.model.preset=vit-s16-reg4
--config.task.dataset=imagenet2012 --config.task.image_size=224
--config.model.image_size=224 --config.model.num_classes=1000 --config.task.path=
--config.train.batch_size=2048 --config.train.lr=3e-3 --config.train.steps=500000;
Vim-Ti: --config.model.preset=vim-tiny with the same task overrides.
"""

from ssm.layers import MambaConfig
from ssm.models import LMConfig
from ssm.models.vim import VimConfig
from ssm.models.vit import ViTConfig
from ssm.config import base, lock, model_config, task_config

IMAGE = dict(image_size=28, patch_size=4, channels=1, num_classes=10)
ARCHS = {
    "vit_reg4": lambda: ViTConfig(d_model=64, n_layer=4, n_heads=4, d_intermediate=128, num_registers=4,
                                  **IMAGE),
    "vit": lambda: ViTConfig(d_model=64, n_layer=4, n_heads=4, d_intermediate=128, num_registers=0,
                             **IMAGE),
    "vim": lambda: VimConfig(d_model=64, n_layer=4, mamba=MambaConfig(d_state=16), **IMAGE),
    "mamba_seq": lambda: LMConfig(d_model=64, n_layer=2, vocab_size=256, pattern="M",
                                  mamba=MambaConfig(d_state=16)),
}


def get_config(arch="vit_reg4"):
  if arch not in ARCHS:
    raise ValueError(f"configs/images.py:{arch}: expected one of {list(ARCHS)}")
  c = base()
  c.task = task_config(
      "images", dataset="fashion_mnist", path="/usr/share/datasets/fashion-mnist",
      data_dir="", download=False, image_size=0, crop_padding=2,
      flip=None,  # the dataset's default: flips, but not for digits
      as_sequence=arch == "mamba_seq", permute=False)
  c.model = model_config(ARCHS[arch]())
  c.train.steps = 300
  c.train.batch_size = 16 if arch == "mamba_seq" else 64  # 784-step scans are slow on CPU
  c.train.lr = 2e-3
  c.train.warmup_steps = 30
  c.train.weight_decay = 0.05
  c.train.log_every = 25
  c.train.eval_every = 100
  c.train.eval_steps = 8
  c.checkpoint.every = 100
  c.checkpoint.best_metric = "eval/accuracy"
  c.checkpoint.best_mode = "max"
  c.wandb.group = "images"
  c.wandb.job_type = arch
  return lock(c)
