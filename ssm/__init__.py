"""ssm: selective state-space models and their baselines in JAX."""

__version__ = "0.1.0"
