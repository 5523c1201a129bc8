"""Layers (Flax NNX): the Mamba mixers and what they share (conv, init), attention, MLPs,
norms, the residual block, and the parameter roles and activation layouts they are made
with (partitioning)."""

from ssm.layers.conv import causal_conv1d
from ssm.layers.mamba import BiMamba, Mamba, MambaCache, MambaConfig
from ssm.layers.mamba2 import Mamba2, Mamba2Cache, Mamba2Config
from ssm.layers.norms import RMSNorm

__all__ = ["BiMamba", "Mamba", "Mamba2", "Mamba2Cache", "Mamba2Config", "MambaCache",
           "MambaConfig", "RMSNorm", "causal_conv1d"]
