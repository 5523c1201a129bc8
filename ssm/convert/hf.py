"""Hugging Face checkpoints -> ssm models.

`load_hf` takes a directory written by `save_pretrained` (config.json and
*.safetensors) or, on a connected machine, a hub name such as
"state-spaces/mamba-130m-hf". Weights are read with safetensors (no torch).
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.flax import load_file

from ssm.layers import MambaConfig
from ssm.models.lm import LanguageModel, LMConfig


def load_hf(path_or_name, *, dtype="float32", scan_impl="auto", revision=None):
  """Returns the ssm model for a Hugging Face checkpoint; `model(ids)` gives logits.

  dtype is the compute dtype ("float32" or "bfloat16"); parameters are float32.
  """
  path = _resolve(path_or_name, revision)
  hf_config = json.loads((path / "config.json").read_text())
  model_type = hf_config.get("model_type")
  if model_type not in CONVERTERS:
    raise ValueError(f"{path}: model_type {model_type!r} is not supported; "
                     f"supported: {', '.join(CONVERTERS)}")
  config_fn, names_fn = CONVERTERS[model_type]
  config = config_fn(hf_config, dtype=dtype, scan_impl=scan_impl)
  weights = _read_weights(path)
  model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
  params = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
  used = set()
  for param_path, var in params.items():
    name, transform = names_fn(param_path)
    if name not in weights:
      raise KeyError(f"{path}: checkpoint has no tensor {name!r} (needed for "
                     f"{'/'.join(map(str, param_path))})")
    value = transform(np.asarray(weights[name], np.float32))
    if value.shape != var.shape:
      raise ValueError(f"{path}: {name} has shape {value.shape} after conversion, "
                       f"the model expects {var.shape}")
    var.set_value(jnp.asarray(value, var.dtype))
    used.add(name)
  _check_tied_head(weights, used, path)
  unused = sorted(set(weights) - used - {"lm_head.weight"})
  if unused:
    raise ValueError(f"{path}: tensors not understood by the converter: {unused[:8]}")
  return model


def _resolve(path_or_name, revision):
  path = Path(path_or_name).expanduser()
  if path.is_dir():
    if not (path / "config.json").exists():
      raise FileNotFoundError(f"{path} has no config.json: pass a directory written by "
                              "save_pretrained, or a hub name")
    return path
  if path.exists() or str(path_or_name).startswith((".", "/", "~")):
    raise FileNotFoundError(f"{path_or_name}: not a checkpoint directory")
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:
    raise ImportError(f"{path_or_name!r} is not a local directory; fetching it from the hub "
                      "needs huggingface_hub: pip install 'ssm-jax[hf]'") from e
  return Path(snapshot_download(str(path_or_name), revision=revision,
                                allow_patterns=["*.json", "*.safetensors"]))


def _read_weights(path):
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{path}: no *.safetensors files; re-save the model with "
                            "save_pretrained(..., safe_serialization=True)")
  weights = {}
  for f in files:
    weights.update(load_file(str(f)))
  return weights


def _check_tied_head(weights, used, path):
  head = weights.get("lm_head.weight")
  if head is None:
    return
  emb = next((weights[n] for n in used if n.endswith("embeddings.weight")), None)
  if emb is None or not np.array_equal(np.asarray(head), np.asarray(emb)):
    raise ValueError(f"{path}: lm_head.weight differs from the input embedding; ssm language "
                     "models tie the two")


# --- Mamba (transformers' MambaForCausalLM) ---------------------------------

def _mamba_config(hf, *, dtype, scan_impl):
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r}: Mamba uses silu")
  if not hf.get("tie_word_embeddings", True):
    raise ValueError("untied word embeddings are not supported")
  d_model = hf["hidden_size"]
  if hf.get("intermediate_size", hf.get("expand", 2) * d_model) != hf.get("expand", 2) * d_model:
    raise ValueError("intermediate_size must equal expand * hidden_size")
  mamba = MambaConfig(
      d_state=hf.get("state_size", 16), d_conv=hf.get("conv_kernel", 4),
      expand=hf.get("expand", 2), dt_rank=hf.get("time_step_rank", "auto"),
      conv_bias=hf.get("use_conv_bias", True), bias=hf.get("use_bias", False),
      scan_impl=scan_impl)
  # The checkpoint's vocabulary is taken as it is: no further padding.
  return LMConfig(d_model=d_model, n_layer=hf["num_hidden_layers"],
                  vocab_size=hf["vocab_size"], pad_vocab_size_multiple=1,
                  norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                  residual_in_fp32=hf.get("residual_in_fp32", True), dtype=dtype, mamba=mamba)


_T = lambda w: w.T
_SAME = lambda w: w


def _mamba_names(param_path):
  """Our parameter path -> (HF tensor name, how to convert it)."""
  if param_path == ("embedding", "embedding"):
    return "backbone.embeddings.weight", _SAME
  if param_path == ("norm_f", "weight"):
    return "backbone.norm_f.weight", _SAME
  _, i, *rest = param_path
  prefix = f"backbone.layers.{i}"
  rest = tuple(rest)
  if rest == ("norm", "weight"):
    return f"{prefix}.norm.weight", _SAME
  mixer = {
      ("in_proj", "kernel"): ("in_proj.weight", _T),
      ("in_proj", "bias"): ("in_proj.bias", _SAME),
      ("conv_weight",): ("conv1d.weight", lambda w: w[:, 0, :].T),  # (E, 1, K) -> (K, E)
      ("conv_bias",): ("conv1d.bias", _SAME),
      ("x_proj", "kernel"): ("x_proj.weight", _T),
      ("dt_proj", "kernel"): ("dt_proj.weight", _T),
      ("dt_proj", "bias"): ("dt_proj.bias", _SAME),
      ("A_log",): ("A_log", _SAME),
      ("D",): ("D", _SAME),
      ("out_proj", "kernel"): ("out_proj.weight", _T),
      ("out_proj", "bias"): ("out_proj.bias", _SAME),
  }
  name, fn = mixer[rest[1:]]
  return f"{prefix}.mixer.{name}", fn


CONVERTERS = {"mamba": (_mamba_config, _mamba_names)}
