"""Hugging Face checkpoints -> ssm models.

`load_hf` takes a directory written by `save_pretrained` (config.json and
*.safetensors) or, on a connected machine, a hub name such as
"state-spaces/mamba-130m-hf". Weights are read with safetensors (no torch).

Each family is a `Converter`: its config function (HF config -> our model class and
config) and its table, data that maps each of our parameters to the checkpoint tensor
it comes from and the named transform (transpose, reshape, split) between them. A new
family is a config function, a table and an entry in CONVERTERS.
"""

import fnmatch
import functools
import json
import re
from pathlib import Path
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.flax import load_file

from ssm.layers import Mamba2Config, MambaConfig
from ssm.layers.attention import AttentionConfig
from ssm.layers.mamba2 import in_proj_parts
from ssm.models.lm import LanguageModel, LMConfig
from ssm.models.vit import ViT, ViTConfig


# What to do when an optional dependency of the import is missing: the [hf] extra, whose
# torch must be a CPU build on a CPU-only machine (README, pyproject.toml).
HF_EXTRA = ("install the [hf] extra: on a CPU-only machine a CPU build of torch first "
            "(pip install torch==2.13.0), then pip install -e '.[hf]' in the ssm checkout")


def load_hf(path_or_name, *, dtype="float32", scan_impl="auto", revision=None):
  """Returns the ssm model for a Hugging Face checkpoint.

  Language models (MambaForCausalLM, Mamba2ForCausalLM, GPT2LMHeadModel,
  LlamaForCausalLM):
  `model(ids)` gives logits (batch, length, vocab). Vision models (ViTModel,
  ViTForImageClassification, Dinov2Model, Dinov2WithRegistersModel) take NHWC images.
  dtype is the compute dtype ("float32" or "bfloat16"); parameters are float32.
  """
  path = _resolve(path_or_name, revision)
  hf_config = json.loads((path / "config.json").read_text())
  model_type = hf_config.get("model_type")
  if model_type not in CONVERTERS:
    raise ValueError(f"{path}: model_type {model_type!r} is not supported; "
                     f"supported: {', '.join(CONVERTERS)}")
  converter = CONVERTERS[model_type]
  weights = _read_weights(path)
  for pattern, new in converter.rename:
    weights = {re.sub(pattern, new, name): w for name, w in weights.items()}
  model_cls, config = converter.config(hf_config, weights, dtype=dtype, scan_impl=scan_impl)
  model = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
  params = {p: var for p, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
  names = {p: _lookup(converter.table, p, model_type) for p in params}
  used = set()
  for param_path, var in params.items():
    name, transform = names[param_path]
    if name not in weights:
      raise KeyError(f"{path}: checkpoint has no tensor {name!r} (needed for "
                     f"{'/'.join(map(str, param_path))})")
    value = transform(np.asarray(weights[name], np.float32), hf_config)
    if value.shape != var.shape:
      raise ValueError(f"{path}: {name} has shape {value.shape} after conversion "
                       f"({transform.__name__}), the model expects {var.shape}")
    var.set_value(jnp.asarray(value, var.dtype))
    used.add(name)
  ignored = {n for n in weights if any(fnmatch.fnmatch(n, pat) for pat in converter.ignore)}
  if "lm_head.weight" in weights and "lm_head.weight" not in used:
    embedding = names[("embedding", "embedding")][0]
    if not np.array_equal(np.asarray(weights["lm_head.weight"]), np.asarray(weights[embedding])):
      raise ValueError(f"{path}: lm_head.weight differs from {embedding} but the config ties "
                       "them (tie_word_embeddings)")
    ignored.add("lm_head.weight")
  unused = sorted(set(weights) - used - ignored)
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
    raise ImportError(f"{path_or_name!r} is not a local directory, and fetching it from the "
                      f"hub needs huggingface_hub: {HF_EXTRA}") from e
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


# --- Tables -----------------------------------------------------------------
#
# A family's table: {our parameter path: checkpoint tensor name, or (name, transform)}.
# Our path is the nnx path joined by "." with the layer index written {i}, as it is in
# the name ("layers.{i}.mixer.D": "backbone.layers.{i}.mixer.D"); a row for a
# parameter the model lacks (an optional bias) is never read. A transform takes the
# tensor (float32 NumPy) and the HF config and returns our parameter; a plain name
# means the tensor as it is.


class Converter(NamedTuple):
  config: Callable  # (hf config, weights, dtype=, scan_impl=) -> (model class, ssm config)
  table: dict  # our parameter path -> checkpoint name, or (name, transform)
  ignore: tuple = ()  # fnmatch patterns of checkpoint tensors the model does not use
  # (regex, replacement) on the checkpoint's names before the table is read: older
  # transformers names -> current ones, prefixes the table does not write
  rename: tuple = ()


def _lookup(table, param_path, model_type):
  """Our parameter path -> (checkpoint tensor name, transform)."""
  layer = [p for p in param_path if isinstance(p, int)]
  key = ".".join("{i}" if isinstance(p, int) else str(p) for p in param_path)
  if key not in table:
    raise KeyError(f"model_type {model_type!r}: the table in ssm/convert/hf.py has no row "
                   f"for our parameter {key}")
  row = table[key]
  name, transform = (row, same) if isinstance(row, str) else row
  return name.format(i=layer[0] if layer else None), transform


def _under(ours, theirs, rows):
  """A submodule's rows placed in the model: both sides prefixed."""
  return {ours + k: theirs + v if isinstance(v, str) else (theirs + v[0], v[1])
          for k, v in rows.items()}


def _named(name, transform):
  transform.__name__ = transform.__qualname__ = name
  return transform


# --- Transforms: (checkpoint tensor, HF config) -> our parameter -------------------

def same(w, hf):
  return w


def transpose(w, hf):
  """torch's Linear weight (out, in) -> our kernel (in, out)."""
  return w.T


def conv_taps(w, hf):
  """A depthwise Conv1d weight (C, 1, K) -> our (K, C)."""
  return w[:, 0, :].T


def halves(w, hf):
  """The last axis (2E) as (2, E): Mamba's in_proj outputs x then z."""
  return w.reshape(*w.shape[:-1], 2, -1)


def first(w, hf):
  """A leading axis of one dropped: (1, T, D) -> (T, D)."""
  return w[0]


def patch_kernel(w, hf):
  """Conv2d (D, C, p, p) -> our patch kernel (p * p * C, D)."""
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def third(i):
  """Part i of the last axis cut in three: GPT-2's c_attn holds q, k and v."""
  return _named(f"third({i})", lambda w, hf: np.split(w, 3, axis=-1)[i])


def mamba2_in_proj(i):
  """Part i of Mamba-2's in_proj outputs (z x | B C | dt), as ssm.layers.mamba2.InProj
  holds them (`in_proj_parts`)."""
  return _named(f"mamba2_in_proj({i})", lambda w, hf: in_proj_parts(
      w, hf["num_heads"] * hf["head_dim"], hf.get("n_groups", 1), hf.get("state_size", 128))[i])


def then(*transforms):
  """The transforms applied in order."""
  return _named(" then ".join(t.__name__ for t in transforms),
                lambda w, hf: functools.reduce(lambda w, t: t(w, hf), transforms, w))


# --- Mamba (transformers' MambaForCausalLM) ---------------------------------

def _mamba_config(hf, weights, *, dtype, scan_impl):
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
  return LanguageModel, LMConfig(d_model=d_model, n_layer=hf["num_hidden_layers"],
                  vocab_size=hf["vocab_size"], pad_vocab_size_multiple=1,
                  norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                  residual_in_fp32=hf.get("residual_in_fp32", True), dtype=dtype, mamba=mamba)


MAMBA = {
    "embedding.embedding": "backbone.embeddings.weight",
    "norm_f.weight": "backbone.norm_f.weight",
    "layers.{i}.norm.weight": "backbone.layers.{i}.norm.weight",
    **_under("layers.{i}.mixer.", "backbone.layers.{i}.mixer.", {
        "in_proj.kernel": ("in_proj.weight", then(transpose, halves)),  # (2E, D) -> (D, 2, E)
        "in_proj.bias": ("in_proj.bias", halves),
        "conv_weight": ("conv1d.weight", conv_taps),
        "conv_bias": "conv1d.bias",
        "x_proj.kernel": ("x_proj.weight", transpose),
        "dt_proj.kernel": ("dt_proj.weight", transpose),
        "dt_proj.bias": "dt_proj.bias",
        "A_log": "A_log",
        "D": "D",
        "out_proj.kernel": ("out_proj.weight", transpose),
        "out_proj.bias": "out_proj.bias",
    }),
}


# --- Mamba-2 (transformers' Mamba2ForCausalLM) --------------------------------

def _mamba2_config(hf, weights, *, dtype, scan_impl):
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r}: Mamba-2 uses silu")
  # transformers 5 writes inf into config.json as {"__float__": "Infinity"}
  as_float = lambda t: float(t["__float__"] if isinstance(t, dict) else t)
  limit = tuple(as_float(t) for t in hf.get("time_step_limit", (0.0, float("inf"))))
  if hf.get("rms_norm", True) is False:
    raise ValueError("rms_norm=False (no gated norm before out_proj) is not supported")
  d_model, expand = hf["hidden_size"], hf.get("expand", 2)
  heads, headdim = hf["num_heads"], hf["head_dim"]
  if heads * headdim != expand * d_model:
    raise ValueError(f"num_heads * head_dim = {heads * headdim} must equal expand * hidden_size "
                     f"= {expand * d_model}")
  eps = hf.get("layer_norm_epsilon", 1e-5)
  mamba2 = Mamba2Config(
      d_state=hf.get("state_size", 128), d_conv=hf.get("conv_kernel", 4), expand=expand,
      headdim=headdim, ngroups=hf.get("n_groups", 1), conv_bias=hf.get("use_conv_bias", True),
      bias=hf.get("use_bias", False), norm_eps=eps, chunk_size=hf.get("chunk_size", 256),
      dt_limit=limit, scan_impl=scan_impl)
  # The checkpoint's vocabulary is taken as it is: no further padding.
  return LanguageModel, LMConfig(
      d_model=d_model, n_layer=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      pattern="S", pad_vocab_size_multiple=1, norm_eps=eps,
      residual_in_fp32=hf.get("residual_in_fp32", True), dtype=dtype,
      tie_embeddings=hf.get("tie_word_embeddings", False), mamba2=mamba2)


MAMBA2 = {
    "embedding.embedding": "backbone.embeddings.weight",
    "norm_f.weight": "backbone.norm_f.weight",
    "lm_head.kernel": ("lm_head.weight", transpose),
    "layers.{i}.norm.weight": "backbone.layers.{i}.norm.weight",
    **_under("layers.{i}.mixer.", "backbone.layers.{i}.mixer.", {
        # one in_proj in the checkpoint, three parts here (ssm.layers.mamba2.InProj)
        **{f"in_proj.kernel{s}": ("in_proj.weight", then(transpose, mamba2_in_proj(i)))
           for i, s in enumerate(("", "_bc", "_dt"))},
        **{f"in_proj.bias{s}": ("in_proj.bias", mamba2_in_proj(i))
           for i, s in enumerate(("", "_bc", "_dt"))},
        "conv_weight": ("conv1d.weight", conv_taps),
        "conv_bias": "conv1d.bias",
        "dt_bias": "dt_bias",
        "A_log": "A_log",
        "D": "D",
        "norm.weight": "norm.weight",
        "out_proj.kernel": ("out_proj.weight", transpose),
        "out_proj.bias": "out_proj.bias",
    }),
}


# --- GPT-2 (GPT2LMHeadModel) -------------------------------------------------

def _gpt2_config(hf, weights, *, dtype, scan_impl):
  del scan_impl
  act = hf.get("activation_function", "gelu_new")
  mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
  if mlp is None:
    raise ValueError(f"activation_function {act!r} is not supported")
  if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
    raise ValueError("only GPT-2's standard attention scaling (1/sqrt(head_dim)) is supported")
  d = hf["n_embd"]
  return LanguageModel, LMConfig(
      d_model=d, n_layer=hf["n_layer"], vocab_size=hf["vocab_size"], pattern="A",
      mlp=mlp, d_intermediate=hf.get("n_inner") or 4 * d, norm="layer",
      norm_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned",
      max_position_embeddings=hf["n_positions"], pad_vocab_size_multiple=1,
      residual_in_fp32=False, linear_init="normal", dtype=dtype,
      tie_embeddings=hf.get("tie_word_embeddings", True),
      attention=AttentionConfig(n_heads=hf["n_head"], bias=True, rope=False))


# GPT-2's Conv1D weights are (in, out) already: only the head is transposed.
GPT2 = {
    "embedding.embedding": "transformer.wte.weight",
    "position_embedding.embedding": "transformer.wpe.weight",
    "norm_f.weight": "transformer.ln_f.weight",
    "norm_f.bias": "transformer.ln_f.bias",
    "lm_head.kernel": ("lm_head.weight", transpose),
    **_under("layers.{i}.", "transformer.h.{i}.", {
        "norm.weight": "ln_1.weight",
        "norm.bias": "ln_1.bias",
        "norm2.weight": "ln_2.weight",
        "norm2.bias": "ln_2.bias",
        **{f"mixer.{x}_proj.{ours}": (f"attn.c_attn.{theirs}", third(i))
           for i, x in enumerate("qkv") for ours, theirs in (("kernel", "weight"), ("bias",) * 2)},
        "mixer.o_proj.kernel": "attn.c_proj.weight",
        "mixer.o_proj.bias": "attn.c_proj.bias",
        "mlp.fc1.kernel": "mlp.c_fc.weight",
        "mlp.fc1.bias": "mlp.c_fc.bias",
        "mlp.fc2.kernel": "mlp.c_proj.weight",
        "mlp.fc2.bias": "mlp.c_proj.bias",
    }),
}


# --- Llama (LlamaForCausalLM) into transformer++ ---------------------------------

def _llama_config(hf, weights, *, dtype, scan_impl):
  del scan_impl
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r}: Llama uses silu")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ValueError(f"rope type {rope.get('rope_type')!r}: only the default RoPE is supported")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  return LanguageModel, LMConfig(
      d_model=d, n_layer=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], pattern="A",
      mlp="swiglu", d_intermediate=hf["intermediate_size"], norm="rms",
      norm_eps=hf.get("rms_norm_eps", 1e-6), pad_vocab_size_multiple=1, dtype=dtype,
      tie_embeddings=hf.get("tie_word_embeddings", False), linear_init="normal",
      attention=AttentionConfig(
          n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
          head_dim=hf.get("head_dim") or d // heads, bias=hf.get("attention_bias", False),
          rope=True, rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0))))


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

LLAMA = {
    "embedding.embedding": "model.embed_tokens.weight",
    "norm_f.weight": "model.norm.weight",
    "lm_head.kernel": ("lm_head.weight", transpose),
    **_under("layers.{i}.", "model.layers.{i}.", {
        "norm.weight": "input_layernorm.weight",
        "norm2.weight": "post_attention_layernorm.weight",
        **{f"mixer.{x}.kernel": (f"self_attn.{x}.weight", transpose) for x in _ATTENTION},
        **{f"mixer.{x}.bias": f"self_attn.{x}.bias" for x in _ATTENTION},
        **{f"mlp.{x}.kernel": (f"mlp.{x}.weight", transpose)
           for x in ("gate_proj", "up_proj", "down_proj")},
    }),
}


# --- ViT (ViTModel, ViTForImageClassification) and DINOv2 with registers ---------

# transformers 4.x names of the encoder's tensors -> the current (5.x) ones.
_ENCODER_RENAMES = (
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"(layer\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
)
_VIT_RENAMES = _ENCODER_RENAMES + ((r"encoder\.layer\.", "layers."),)


def _vision_common(hf, kind):
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r}: only gelu is supported")
  if hf.get("use_swiglu_ffn"):
    raise ValueError("use_swiglu_ffn=True (DINOv2 giant) is not supported")
  size, patch = hf.get("image_size", 224), hf.get("patch_size", 16)
  if not isinstance(size, int) or not isinstance(patch, int):
    raise ValueError(f"{kind}: only square image_size and patch_size are supported")
  d = hf["hidden_size"]
  return dict(image_size=size, patch_size=patch, channels=hf.get("num_channels", 3), d_model=d,
              n_layer=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
              qkv_bias=hf.get("qkv_bias", True))


def _vit_config(hf, weights, *, dtype, scan_impl):
  del scan_impl
  head = weights.get("classifier.weight")
  return ViT, ViTConfig(**_vision_common(hf, "ViT"), d_intermediate=hf["intermediate_size"],
                        norm_eps=hf.get("layer_norm_eps", 1e-12), dtype=dtype,
                        num_classes=0 if head is None else head.shape[0])


def _dinov2_config(hf, weights, *, dtype, scan_impl):
  del scan_impl, weights
  common = _vision_common(hf, "DINOv2")
  return ViT, ViTConfig(**common, d_intermediate=int(common["d_model"] * hf.get("mlp_ratio", 4)),
                        norm_eps=hf.get("layer_norm_eps", 1e-6), dtype=dtype, num_classes=0,
                        num_registers=hf.get("num_register_tokens",
                                             0 if hf.get("model_type") == "dinov2" else 4),
                        layer_scale=hf.get("layerscale_value", 1.0))


def _linear(ours, theirs):
  """A torch Linear's two rows."""
  return {f"{ours}.kernel": (f"{theirs}.weight", transpose), f"{ours}.bias": f"{theirs}.bias"}


def _vision_table(layers, norms):
  """ViT's and DINOv2's table: `layers` the encoder's list of layers, `norms` the names
  of a layer's two norms."""
  return {
      "patch_embedding.proj.kernel": ("embeddings.patch_embeddings.projection.weight",
                                      patch_kernel),
      "patch_embedding.proj.bias": "embeddings.patch_embeddings.projection.bias",
      "cls_token": "embeddings.cls_token",
      "register_tokens": "embeddings.register_tokens",
      "position_embedding": ("embeddings.position_embeddings", first),
      "norm.weight": "layernorm.weight",
      "norm.bias": "layernorm.bias",
      **_linear("head", "classifier"),
      **_under("layers.{i}.", layers + ".{i}.", {
          **{f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in zip(("norm", "norm2"), norms)
             for p in ("weight", "bias")},
          "layer_scale1": "layer_scale1.lambda1",
          "layer_scale2": "layer_scale2.lambda1",
          **{k: v for x in _ATTENTION for k, v in _linear(f"mixer.{x}", f"attention.{x}").items()},
          **_linear("mlp.fc1", "mlp.fc1"),
          **_linear("mlp.fc2", "mlp.fc2"),
      }),
  }


VIT = _vision_table("layers", ("layernorm_before", "layernorm_after"))
DINOV2 = _vision_table("encoder.layer", ("norm1", "norm2"))


CONVERTERS = {
    "mamba": Converter(_mamba_config, MAMBA),
    "mamba2": Converter(_mamba2_config, MAMBA2),
    "gpt2": Converter(_gpt2_config, GPT2, ignore=("*.attn.bias", "*.attn.masked_bias")),
    "llama": Converter(_llama_config, LLAMA),
    # ViTModel's pooler (dense + tanh on CLS) is not part of the ViT; DINOv2's mask
    # token only serves masked-image pretraining. ViTForImageClassification keeps the
    # encoder under "vit.", which the table does not write.
    "vit": Converter(_vit_config, VIT, ignore=("pooler.*",),
                     rename=_VIT_RENAMES + ((r"^vit\.", ""),)),
    "dinov2_with_registers": Converter(_dinov2_config, DINOV2, ignore=("embeddings.mask_token",),
                                       rename=_ENCODER_RENAMES),
    # DINOv2 without registers (facebook/dinov2-*): the same tensors but the registers
    "dinov2": Converter(_dinov2_config, DINOV2, ignore=("embeddings.mask_token",),
                        rename=_ENCODER_RENAMES),
}
