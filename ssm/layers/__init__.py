"""Layers (Flax NNX): norms, the Mamba mixer."""

from ssm.layers.mamba import Mamba, MambaCache, MambaConfig, causal_conv1d
from ssm.layers.norms import RMSNorm

__all__ = ["Mamba", "MambaCache", "MambaConfig", "RMSNorm", "causal_conv1d"]
