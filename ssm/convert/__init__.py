"""Import of Hugging Face checkpoints: `ssm.convert.load_hf(path_or_hub_name)`."""

from ssm.convert.hf import load_hf

__all__ = ["load_hf"]
