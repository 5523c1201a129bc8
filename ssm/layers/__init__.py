"""Layers (Flax NNX): the Mamba mixer, attention, MLPs, norms, the residual block, and
the parameter roles and activation layouts they are made with (partitioning)."""

from ssm.layers.mamba import BiMamba, Mamba, MambaCache, MambaConfig, causal_conv1d
from ssm.layers.norms import RMSNorm

__all__ = ["BiMamba", "Mamba", "MambaCache", "MambaConfig", "RMSNorm", "causal_conv1d"]
