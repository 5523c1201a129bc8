"""Models: language models (Mamba) and their named presets."""

from ssm.models.lm import LanguageModel, LMConfig, param_count
from ssm.models.presets import PRESETS, get_preset

__all__ = ["LMConfig", "LanguageModel", "PRESETS", "get_preset", "param_count"]
