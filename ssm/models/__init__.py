"""Models: language models (Mamba, Transformer, hybrid) and vision models (ViT with
registers, Vision Mamba), and their named presets."""

from ssm.models.lm import LanguageModel, LMConfig
from ssm.models.vim import VimConfig, VisionMamba
from ssm.models.vit import ViT, ViTConfig

MODEL_CLASSES = {LMConfig: LanguageModel, ViTConfig: ViT, VimConfig: VisionMamba}


def model_class(config):
  """The model class a config builds."""
  if type(config) not in MODEL_CLASSES:
    raise TypeError(f"no model for a {type(config).__name__}")
  return MODEL_CLASSES[type(config)]


def build(config, *, rngs):
  return model_class(config)(config, rngs=rngs)


from ssm.models.presets import PRESETS, get_preset  # noqa: E402  (presets need the configs)

__all__ = ["LMConfig", "LanguageModel", "MODEL_CLASSES", "PRESETS", "ViT", "ViTConfig",
           "VimConfig", "VisionMamba", "build", "get_preset", "model_class"]
