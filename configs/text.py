"""Language modelling on tokenized text (Mamba Figure 4's setting at CPU size): documents
tokenized once into a cache (ssm.data.tokenized), packed into rows with a reset at
every document start, perplexity and bits per byte on the held-out text.

By default Tiny Shakespeare (shipped, ssm/data/corpora), one document per speech,
with the byte-level BPE of 1024 ids trained on it (shipped beside it):

  ssm-train --config configs/text.py:mamba --workdir runs/text-mamba
  ssm-train --config configs/text.py:transformer --workdir runs/text-tpp
  ssm-eval runs/text-mamba                      # perplexity, bits per byte, loss by position

Your own corpus and tokenizer (model.vocab_size=0, the default: the tokenizer's, padded):
  ssm-tokenizer my_corpus/ --vocab-size 8192 --out runs/bpe.json
  ssm-train --config configs/text.py:mamba --workdir runs/mine \\
            --config.task.path=my_corpus/ --config.task.tokenizer=runs/bpe.json
A hub tokenizer and a streamed corpus (a connected GPU machine; pip install 'ssm-jax[lm]'):
  --config.task.tokenizer=EleutherAI/gpt-neox-20b --config.task.path= \\
  --config.task.hf_dataset=HuggingFaceFW/fineweb-edu --config.task.hf_config=sample-10BT \\
  --config.task.eval_split= --config.task.max_documents=2000000 --config.task.seq_len=2048
or a tfds corpus: --config.task.path= --config.task.dataset=lm1b (pg19, wiki40b/en, c4/en).
"""

from ssm.data.text import SHAKESPEARE
from ssm.data.tokenized import SHAKESPEARE_BPE
from ssm.layers import MambaConfig
from ssm.layers.attention import AttentionConfig
from ssm.models import LMConfig
from ssm.config import base, lock, model_config, task_config

ARCHS = {
    "mamba": dict(pattern="M", n_layer=4),
    "mamba2": dict(pattern="S", n_layer=4),
    "transformer": dict(pattern="A", n_layer=2, mlp="swiglu", d_intermediate=256),
    "hybrid": dict(pattern="MMMA", n_layer=4),
}


def get_config(arch="mamba"):
  if arch not in ARCHS:
    raise ValueError(f"configs/text.py:{arch}: expected one of {list(ARCHS)}")
  c = base()
  c.task = task_config("text", path=str(SHAKESPEARE), tokenizer=str(SHAKESPEARE_BPE),
                       doc_separator="\n\n", seq_len=128, eval_seq_lens=(512,))
  c.model = model_config(LMConfig(
      d_model=64, vocab_size=1, mamba=MambaConfig(d_state=16),
      attention=AttentionConfig(n_heads=4), **ARCHS[arch]))
  c.model.vocab_size = 0  # the tokenizer's
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 60
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.eval_steps = 8
  c.checkpoint.every = 200
  c.checkpoint.best_metric = "eval/bits_per_byte"
  c.wandb.group = "text"
  c.wandb.job_type = arch
  return lock(c)
