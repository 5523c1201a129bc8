"""Named model sizes.

mamba-*: the released Mamba checkpoints (GPT-NeoX tokenizer, vocabulary 50277 padded
to 50280). mamba2-*: the released Mamba-2 checkpoints (state-spaces/mamba2-*'s
config.json: the official Mamba2 mixer, d_state 128, headdim 64, expand 2, one
group, chunks of 256; vocabulary 50277 padded to a multiple of 16, 50288). transformer++-*: the Mamba paper's Llama-style baseline at the same width
and half the depth (one attention+SwiGLU layer holds about the parameters of two
Mamba layers; SwiGLU width 8/3 d rounded up to a multiple of 256, as Llama). gpt2-*:
OpenAI's GPT-2 (vocabulary 50257 unpadded, 1024 learned positions). vit-*: the ViT
sizes of Dosovitskiy et al. / DeiT at 224px, patch 16, 1000 classes (-reg4: with 4
registers). vim-*: Vision Mamba's tiny and small.
"""

from ssm.layers import Mamba2Config
from ssm.layers.attention import AttentionConfig
from ssm.models.lm import LMConfig
from ssm.models.vim import VimConfig
from ssm.models.vit import ViTConfig

NEOX_VOCAB = 50277
GPT2_VOCAB = 50257


def mamba(d_model, n_layer):
  return LMConfig(d_model=d_model, n_layer=n_layer, vocab_size=NEOX_VOCAB)


def mamba2(d_model, n_layer):
  return LMConfig(d_model=d_model, n_layer=n_layer, vocab_size=NEOX_VOCAB, pattern="S",
                  pad_vocab_size_multiple=16, mamba2=Mamba2Config())


def transformer_pp(d_model, n_layer, n_heads):
  d_ff = -(-8 * d_model // 3 // 256) * 256
  return LMConfig(d_model=d_model, n_layer=n_layer, vocab_size=NEOX_VOCAB, pattern="A",
                  mlp="swiglu", d_intermediate=d_ff, attention=AttentionConfig(n_heads=n_heads))


def gpt2(d_model, n_layer, n_heads):
  return LMConfig(d_model=d_model, n_layer=n_layer, vocab_size=GPT2_VOCAB, pattern="A",
                  mlp="gelu_tanh", d_intermediate=4 * d_model, norm="layer", positions="learned",
                  max_position_embeddings=1024, pad_vocab_size_multiple=1, residual_in_fp32=False,
                  linear_init="normal",
                  attention=AttentionConfig(n_heads=n_heads, bias=True, rope=False))


def vit(d_model, n_layer, n_heads, num_registers=0):
  return ViTConfig(d_model=d_model, n_layer=n_layer, n_heads=n_heads,
                   d_intermediate=4 * d_model, num_registers=num_registers)


PRESETS = {
    "mamba-130m": mamba(768, 24),
    "mamba-370m": mamba(1024, 48),
    "mamba-790m": mamba(1536, 48),
    "mamba-1.4b": mamba(2048, 48),
    "mamba-2.8b": mamba(2560, 64),
    "mamba2-130m": mamba2(768, 24),
    "mamba2-370m": mamba2(1024, 48),
    "mamba2-780m": mamba2(1536, 48),
    "mamba2-1.3b": mamba2(2048, 48),
    "mamba2-2.7b": mamba2(2560, 64),
    "transformer++-130m": transformer_pp(768, 12, 12),
    "transformer++-370m": transformer_pp(1024, 24, 16),
    "transformer++-790m": transformer_pp(1536, 24, 16),
    "transformer++-1.4b": transformer_pp(2048, 24, 16),
    "transformer++-2.8b": transformer_pp(2560, 32, 32),
    "gpt2-small": gpt2(768, 12, 12),
    "gpt2-medium": gpt2(1024, 24, 16),
    "vit-ti16": vit(192, 12, 3),
    "vit-s16": vit(384, 12, 6),
    "vit-b16": vit(768, 12, 12),
    "vit-ti16-reg4": vit(192, 12, 3, num_registers=4),
    "vit-s16-reg4": vit(384, 12, 6, num_registers=4),
    "vit-b16-reg4": vit(768, 12, 12, num_registers=4),
    "vim-tiny": VimConfig(d_model=192, n_layer=24),
    "vim-small": VimConfig(d_model=384, n_layer=24),
}


def get_preset(name):
  if name not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
  return PRESETS[name]
