"""Hugging Face checkpoints -> ssm models.

`load_hf` takes a directory written by `save_pretrained` (config.json and
*.safetensors) or, on a connected machine, a hub name such as
"state-spaces/mamba-130m-hf". Weights are read with safetensors (no torch).
"""

import fnmatch
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
  names = {p: converter.names(p, hf_config, weights) for p in params}
  used = set()
  for param_path, var in params.items():
    name, transform = names[param_path]
    if name not in weights:
      raise KeyError(f"{path}: checkpoint has no tensor {name!r} (needed for "
                     f"{'/'.join(map(str, param_path))})")
    value = transform(np.asarray(weights[name], np.float32))
    if value.shape != var.shape:
      raise ValueError(f"{path}: {name} has shape {value.shape} after conversion, "
                       f"the model expects {var.shape}")
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


_T = lambda w: w.T
_SAME = lambda w: w


def _mamba_names(param_path, hf, weights):
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
      # (2E, D), x then z -> (D, 2, E)
      ("in_proj", "kernel"): ("in_proj.weight", lambda w: w.T.reshape(w.shape[1], 2, -1)),
      ("in_proj", "bias"): ("in_proj.bias", lambda w: w.reshape(2, -1)),
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


def _mamba2_names(param_path, hf, weights):
  """Our parameter path -> (HF tensor name, how to convert it)."""
  top = {("embedding", "embedding"): ("backbone.embeddings.weight", _SAME),
         ("norm_f", "weight"): ("backbone.norm_f.weight", _SAME),
         ("lm_head", "kernel"): ("lm_head.weight", _T)}
  if param_path in top:
    return top[param_path]
  _, i, *rest = param_path
  prefix = f"backbone.layers.{i}"
  rest = tuple(rest)
  if rest == ("norm", "weight"):
    return f"{prefix}.norm.weight", _SAME
  # in_proj's (z, x, B, C, dt) rows -> our three parts (ssm.layers.mamba2.in_proj_parts)
  part = lambda i: lambda w: in_proj_parts(w, hf["num_heads"] * hf["head_dim"],
                                           hf.get("n_groups", 1), hf.get("state_size", 128))[i]
  mixer = {
      **{("in_proj", "kernel" + s): ("in_proj.weight", lambda w, f=part(i): f(w.T))
         for i, s in enumerate(("", "_bc", "_dt"))},
      **{("in_proj", "bias" + s): ("in_proj.bias", part(i))
         for i, s in enumerate(("", "_bc", "_dt"))},
      ("conv_weight",): ("conv1d.weight", lambda w: w[:, 0, :].T),  # (X, 1, K) -> (K, X)
      ("conv_bias",): ("conv1d.bias", _SAME),
      ("dt_bias",): ("dt_bias", _SAME),
      ("A_log",): ("A_log", _SAME),
      ("D",): ("D", _SAME),
      ("norm", "weight"): ("norm.weight", _SAME),
      ("out_proj", "kernel"): ("out_proj.weight", _T),
      ("out_proj", "bias"): ("out_proj.bias", _SAME),
  }
  name, fn = mixer[rest[1:]]
  return f"{prefix}.mixer.{name}", fn


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


def _gpt2_names(param_path, hf, weights):
  """GPT-2's Conv1D weights are (in, out) already; c_attn holds q, k and v."""
  top = {("embedding", "embedding"): "transformer.wte.weight",
         ("position_embedding", "embedding"): "transformer.wpe.weight",
         ("norm_f", "weight"): "transformer.ln_f.weight",
         ("norm_f", "bias"): "transformer.ln_f.bias",
         ("lm_head", "kernel"): "lm_head.weight"}
  if param_path in top:
    return top[param_path], _T if param_path[0] == "lm_head" else _SAME
  _, i, *rest = param_path
  prefix, d = f"transformer.h.{i}", hf["n_embd"]
  rest = tuple(rest)
  simple = {("norm", "weight"): "ln_1.weight", ("norm", "bias"): "ln_1.bias",
            ("norm2", "weight"): "ln_2.weight", ("norm2", "bias"): "ln_2.bias",
            ("mixer", "o_proj", "kernel"): "attn.c_proj.weight",
            ("mixer", "o_proj", "bias"): "attn.c_proj.bias",
            ("mlp", "fc1", "kernel"): "mlp.c_fc.weight", ("mlp", "fc1", "bias"): "mlp.c_fc.bias",
            ("mlp", "fc2", "kernel"): "mlp.c_proj.weight", ("mlp", "fc2", "bias"): "mlp.c_proj.bias"}
  if rest in simple:
    return f"{prefix}.{simple[rest]}", _SAME
  which = "qkv".index(rest[1][0])  # q_proj, k_proj, v_proj: a third of c_attn
  part = lambda w: w[..., which * d:(which + 1) * d]
  return f"{prefix}.attn.c_attn.{'weight' if rest[2] == 'kernel' else 'bias'}", part


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


def _llama_names(param_path, hf, weights):
  """Linear weights are (out, in) in torch: transposed."""
  top = {("embedding", "embedding"): ("model.embed_tokens.weight", _SAME),
         ("norm_f", "weight"): ("model.norm.weight", _SAME),
         ("lm_head", "kernel"): ("lm_head.weight", _T)}
  if param_path in top:
    return top[param_path]
  _, i, *rest = param_path
  rest = tuple(rest)
  if rest == ("norm", "weight"):
    return f"model.layers.{i}.input_layernorm.weight", _SAME
  if rest == ("norm2", "weight"):
    return f"model.layers.{i}.post_attention_layernorm.weight", _SAME
  module = {"mixer": "self_attn", "mlp": "mlp"}[rest[0]]
  kind = "weight" if rest[2] == "kernel" else "bias"
  return f"model.layers.{i}.{module}.{rest[1]}.{kind}", _T if kind == "weight" else _SAME


class Converter(NamedTuple):
  config: Callable  # (hf config, weights, dtype=, scan_impl=) -> (model class, ssm config)
  names: Callable  # (our param path, hf config, weights) -> (hf tensor name, transform)
  ignore: tuple = ()  # fnmatch patterns of checkpoint tensors the model does not use
  rename: tuple = ()  # (regex, replacement): older transformers names -> current ones


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


def _patch_kernel(w):
  """Conv2d (D, C, p, p) -> our patch kernel (p * p * C, D)."""
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _vision_names(param_path, hf, weights, *, base, layer, norms, scales=False):
  top = {("patch_embedding", "proj", "kernel"): ("embeddings.patch_embeddings.projection.weight",
                                                 _patch_kernel),
         ("patch_embedding", "proj", "bias"): ("embeddings.patch_embeddings.projection.bias", _SAME),
         ("cls_token",): ("embeddings.cls_token", _SAME),
         ("register_tokens",): ("embeddings.register_tokens", _SAME),
         ("position_embedding",): ("embeddings.position_embeddings", lambda w: w[0]),
         ("norm", "weight"): ("layernorm.weight", _SAME),
         ("norm", "bias"): ("layernorm.bias", _SAME)}
  if param_path[0] == "head":
    return f"classifier.{'weight' if param_path[1] == 'kernel' else 'bias'}", (
        _T if param_path[1] == "kernel" else _SAME)
  if param_path in top:
    name, fn = top[param_path]
    return base + name, fn
  _, i, *rest = param_path
  prefix = f"{base}{layer}.{i}"
  if rest[0] in ("norm", "norm2"):
    return f"{prefix}.{norms[rest[0]]}.{rest[1]}", _SAME
  if rest[0] in ("layer_scale1", "layer_scale2"):
    return f"{prefix}.{rest[0]}.lambda1", _SAME
  module = {"mixer": "attention", "mlp": "mlp"}[rest[0]]
  kind = "weight" if rest[2] == "kernel" else "bias"
  return f"{prefix}.{module}.{rest[1]}.{kind}", _T if kind == "weight" else _SAME


def _vit_names(param_path, hf, weights):
  base = "vit." if any(n.startswith("vit.") for n in weights) else ""
  return _vision_names(param_path, hf, weights, base=base, layer="layers",
                       norms={"norm": "layernorm_before", "norm2": "layernorm_after"})


def _dinov2_names(param_path, hf, weights):
  return _vision_names(param_path, hf, weights, base="", layer="encoder.layer",
                       norms={"norm": "norm1", "norm2": "norm2"})


CONVERTERS = {
    "mamba": Converter(_mamba_config, _mamba_names),
    "mamba2": Converter(_mamba2_config, _mamba2_names),
    "gpt2": Converter(_gpt2_config, _gpt2_names, ignore=("*.attn.bias", "*.attn.masked_bias")),
    "llama": Converter(_llama_config, _llama_names),
    # ViTModel's pooler (dense + tanh on CLS) is not part of the ViT; DINOv2's mask
    # token only serves masked-image pretraining.
    "vit": Converter(_vit_config, _vit_names, ignore=("pooler.*", "vit.pooler.*"),
                     rename=_VIT_RENAMES),
    "dinov2_with_registers": Converter(_dinov2_config, _dinov2_names,
                                       ignore=("embeddings.mask_token",),
                                       rename=_ENCODER_RENAMES),
    # DINOv2 without registers (facebook/dinov2-*): the same tensors but the registers
    "dinov2": Converter(_dinov2_config, _dinov2_names, ignore=("embeddings.mask_token",),
                        rename=_ENCODER_RENAMES),
}
