"""Generation: samplers (each a pure function of the logits), prefill + one compiled
decode loop over ragged batches, and speculative decoding."""

from ssm.generate.decode import Generation, generate
from ssm.generate.sampling import (Sampling, min_p, pick, probabilities, process,
                                   repetition_penalty, temperature, top_k, top_p)
from ssm.generate.speculative import SpeculativeGeneration, speculative_generate

__all__ = ["Generation", "Sampling", "SpeculativeGeneration", "generate", "min_p", "pick",
           "probabilities", "process", "repetition_penalty", "speculative_generate",
           "temperature", "top_k", "top_p"]
