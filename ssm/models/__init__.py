"""Models: language models (Mamba, Transformer, hybrid) and vision models (ViT with
registers, Vision Mamba), and their named presets."""

from ssm.fields import from_dict
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


KINDS = {"lm": LMConfig, "vit": ViTConfig, "vim": VimConfig}


def config_from_dict(fields):
  """A model config from a plain dict, e.g. an ml_collections `config.model`:
  {"kind": "lm", "d_model": 64, ..., "mamba": {"d_state": 16}}. A preset name under
  "preset" gives the defaults. Unknown keys are errors that name the valid ones."""
  fields = dict(fields.to_dict() if hasattr(fields, "to_dict") else fields)
  kind = fields.pop("kind", "lm")
  preset = fields.pop("preset", "")
  if kind not in KINDS:
    raise ValueError(f"model.kind {kind!r}: expected one of {list(KINDS)}")
  base = get_preset(preset) if preset else None
  return from_dict(type(base) if base else KINDS[kind], fields, "model", base)


from ssm.models.presets import PRESETS, get_preset  # noqa: E402  (presets need the configs)

__all__ = ["LMConfig", "LanguageModel", "MODEL_CLASSES", "PRESETS", "ViT", "ViTConfig",
           "VimConfig", "VisionMamba", "build", "config_from_dict", "get_preset",
           "model_class"]
