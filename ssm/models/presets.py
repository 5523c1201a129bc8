"""Named model sizes: the released Mamba checkpoints (GPT-NeoX tokenizer,
vocabulary 50277 padded to 50280)."""

from ssm.models.lm import LMConfig

NEOX_VOCAB = 50277

PRESETS = {
    "mamba-130m": LMConfig(d_model=768, n_layer=24, vocab_size=NEOX_VOCAB),
    "mamba-370m": LMConfig(d_model=1024, n_layer=48, vocab_size=NEOX_VOCAB),
    "mamba-790m": LMConfig(d_model=1536, n_layer=48, vocab_size=NEOX_VOCAB),
    "mamba-1.4b": LMConfig(d_model=2048, n_layer=48, vocab_size=NEOX_VOCAB),
    "mamba-2.8b": LMConfig(d_model=2560, n_layer=64, vocab_size=NEOX_VOCAB),
}


def get_preset(name):
  if name not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
  return PRESETS[name]
