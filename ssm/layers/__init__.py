"""Layers (Flax NNX): norms, the Mamba mixer."""

from ssm.layers.mamba import BiMamba, Mamba, MambaCache, MambaConfig, causal_conv1d
from ssm.layers.norms import RMSNorm

__all__ = ["BiMamba", "Mamba", "MambaCache", "MambaConfig", "RMSNorm", "causal_conv1d"]
