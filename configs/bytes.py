"""Byte-level language modelling (the MambaByte setting): text as bytes, packed
into rows with document boundaries reset, bits per byte as the metric. By default
Tiny Shakespeare, shipped with the package (ssm/data/corpora), with models small
enough for a 2-core CPU:

  ssm-train --config configs/bytes.py:mamba --workdir runs/bytes-mamba
  ssm-train --config configs/bytes.py:transformer --workdir runs/bytes-tpp
  ssm-train --config configs/bytes.py:mamba2 --workdir runs/bytes-mamba2

Another local file: --config.task.path=my.txt (a glob or a directory also works;
--config.task.doc_separator='\\n\\n' splits files into documents). A tfds dataset,
read as ArrayRecord without TensorFlow: --config.task.path= --config.task.dataset=
tiny_shakespeare (or pg19, lm1b; --config.task.download=True lets tfds prepare it).

MambaByte's PG19 setting (MambaByte-353M: d_model 1024, 53 Mamba layers, 8192-byte
rows): --config.task.path= --config.task.dataset=pg19 --config.task.seq_len=8192
--config.model.d_model=1024 --config.model.n_layer=53 --config.train.batch_size=32.
"""

from ssm.data.text import SHAKESPEARE, VOCAB_SIZE
from ssm.layers import MambaConfig
from ssm.layers.attention import AttentionConfig
from ssm.models import LMConfig
from ssm.config import base, lock, model_config, task_config

ARCHS = {
    "mamba": dict(pattern="M", n_layer=4),
    "transformer": dict(pattern="A", n_layer=2, mlp="swiglu", d_intermediate=256),
    "hybrid": dict(pattern="MMMA", n_layer=4),
    "mamba2": dict(pattern="S", n_layer=4),  # the official Mamba-2 mixer (d_state 128)
}


def get_config(arch="mamba"):
  if arch not in ARCHS:
    raise ValueError(f"configs/bytes.py:{arch}: expected one of {list(ARCHS)}")
  c = base()
  c.task = task_config("bytes", path=str(SHAKESPEARE), dataset="", data_dir="", download=False,
                       seq_len=256, doc_separator="")
  c.model = model_config(LMConfig(
      d_model=64, vocab_size=VOCAB_SIZE, mamba=MambaConfig(d_state=16),
      attention=AttentionConfig(n_heads=4), **ARCHS[arch]))
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 30
  c.train.log_every = 25
  c.train.eval_every = 100
  c.train.eval_steps = 4
  c.checkpoint.every = 100
  c.checkpoint.best_metric = "eval/bits_per_byte"
  c.wandb.group = "bytes"
  c.wandb.job_type = arch
  return lock(c)
