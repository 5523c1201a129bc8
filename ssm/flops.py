"""Parameter and FLOP accounting, and the matching of sizes across architectures.

`param_count` counts the built model's parameters from its abstract shapes;
`lm_params` is the same count in closed form (tested equal), fast enough to search
over sizes. FLOPs are forward FLOPs per token (language models) or per image
(vision models), each term apart; training is 3x forward. Attention scores and
values are counted in full, 4 * L * d_attn per token per layer (as XLA computes
the masked matmuls); `causal_half=True` counts only the causal triangle.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ssm.layers.attention import AttentionConfig
from ssm.models import LMConfig, ViTConfig, build
from ssm.scan import selective_scan

SCAN_FLOPS = 9  # per (token, channel, state): exp(delta A), the update, <h, C>
GATED_NORM_FLOPS = 6  # per channel: Mamba-2's y * silu(z), then the RMSNorm


def abstract_model(config):
  """The model a config builds, with shapes and dtypes only: nothing allocated."""
  return nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0)))


def param_count(config, embeddings=True):
  """Exact parameter count. Without `embeddings`, token and position embeddings
  (the lookup tables; a tied head is the token embedding) are left out."""
  model = abstract_model(config)
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if not embeddings:
    for name in ("embedding", "position_embedding"):
      table = getattr(model, name, None)
      if isinstance(table, nnx.Embed):
        table = table.embedding
      if isinstance(table, nnx.Param):
        total -= math.prod(table.shape)
  return total


def _mamba_dims(d_model, m):
  E = m.expand * d_model
  R = math.ceil(d_model / 16) if m.dt_rank == "auto" else m.dt_rank
  return E, R, m.d_state, m.d_conv


def _mamba2_dims(d_model, m):
  """(E, H, P, G, N, K, X): d_inner, heads, headdim, groups, state, conv width and
  conv channels of a Mamba-2 mixer."""
  E, H, X = m.dims(d_model)
  return E, H, m.headdim, m.ngroups, m.d_state, m.d_conv, X


def ssd_flops(d_model, m, seq_len):
  """Forward FLOPs per token of the chunked SSD (ssm.scan.ssd) at chunk T = min(chunk
  size, seq_len), the matmuls in full (masked, as computed), padded steps included:
  C B^T per group (2 T N G), the masked decay and dt on it (3 T per head), its product
  with x (2 T P per head), each chunk's state and the read-out of the chunk-start
  state (2 N P per head each), the chunk recurrence (2 N P / T per head) and the D
  skip (2 P per head). Exponentials are transcendentals, not counted."""
  E, H, P, G, N, _, _ = _mamba2_dims(d_model, m)
  T = min(m.chunk_size, seq_len)
  padded = -(-seq_len // T) * T / seq_len
  per_token = 2 * T * N * G + H * (3 * T + 2 * T * P + 4 * N * P + 2 * N * P / T + 2 * P)
  return round(padded * per_token)


def _attn_dims(d_model, a: AttentionConfig):
  H = a.n_heads
  return H, a.n_kv_heads or H, a.head_dim or d_model // H


def _layer_terms(c: LMConfig, kind):
  """(parameters, matmul parameters, elementwise FLOPs per token) of one layer."""
  D = c.d_model
  norm = D * (2 if c.norm == "layer" else 1)
  params, matmul, extra = norm, 0, 4 * D  # the norm: ~4 FLOPs per element
  if kind == "M":
    E, R, N, K = _mamba_dims(D, c.mamba)
    w = D * 2 * E + E * (R + 2 * N) + R * E + E * D
    params += w + K * E + E * c.mamba.conv_bias + E + E * N + E
    params += (2 * E + D) * c.mamba.bias
    matmul += w
    extra += 2 * K * E + SCAN_FLOPS * E * N
  elif kind == "S":  # Mamba-2; the SSD's FLOPs depend on the length: see lm_flops
    E, H, P, G, N, K, X = _mamba2_dims(D, c.mamba2)
    d_in_proj = 2 * E + 2 * G * N + H
    w = D * d_in_proj + E * D
    params += w + K * X + X * c.mamba2.conv_bias + 3 * H + E + (d_in_proj + D) * c.mamba2.bias
    matmul += w
    extra += 2 * K * X + GATED_NORM_FLOPS * E
  else:
    H, G, Kh = _attn_dims(D, c.attention)
    w = D * H * Kh + 2 * D * G * Kh + H * Kh * D
    params += w + (H * Kh + 2 * G * Kh + D) * c.attention.bias
    matmul += w
  if c.mlp != "none":
    F = c.d_intermediate
    w = (3 if c.mlp == "swiglu" else 2) * D * F
    params += norm + w + (F + D) * (c.mlp != "swiglu")
    matmul += w
    extra += 4 * D
  return params, matmul, extra


def lm_params(c: LMConfig):
  """The language model's exact parameter count, in closed form."""
  V, D = c.padded_vocab_size, c.d_model
  total = V * D + (c.max_position_embeddings * D if c.positions == "learned" else 0)
  total += 0 if c.tie_embeddings else D * V
  total += sum(_layer_terms(c, kind)[0] for kind in c.layer_mixers)
  return total + D * (2 if c.norm == "layer" else 1)


def lm_flops(c: LMConfig, seq_len, causal_half=False):
  """Forward FLOPs per token at sequence length `seq_len`, by term."""
  terms = dict(matmul=0, attention=0, scan=0, conv=0, norms=0)
  for kind in c.layer_mixers:
    _, matmul, extra = _layer_terms(c, kind)
    terms["matmul"] += 2 * matmul
    if kind == "M":
      E, _, N, K = _mamba_dims(c.d_model, c.mamba)
      terms["scan"] += SCAN_FLOPS * E * N
      terms["conv"] += 2 * K * E
      terms["norms"] += extra - SCAN_FLOPS * E * N - 2 * K * E
    elif kind == "S":
      *_, K, X = _mamba2_dims(c.d_model, c.mamba2)
      terms["scan"] += ssd_flops(c.d_model, c.mamba2, seq_len)
      terms["conv"] += 2 * K * X
      terms["norms"] += extra - 2 * K * X
    else:
      H, _, Kh = _attn_dims(c.d_model, c.attention)
      terms["attention"] += 4 * seq_len * H * Kh // (2 if causal_half else 1)
      terms["norms"] += extra
  terms["norms"] += 4 * c.d_model
  terms["head"] = 2 * c.d_model * c.padded_vocab_size
  terms["total"] = sum(terms.values())
  return terms


def vision_flops(c):
  """Forward FLOPs per image for ViTConfig / VimConfig, by term."""
  D, P, R = c.d_model, c.grid**2, c.num_registers
  T = 1 + R + P
  terms = dict(patch=2 * c.patch_size**2 * c.channels * D * P, matmul=0, attention=0, scan=0,
               conv=0, norms=0, head=2 * D * c.num_classes)
  if isinstance(c, ViTConfig):
    per_layer = 4 * D * D + 2 * D * c.d_intermediate
    terms["matmul"] = 2 * per_layer * T * c.n_layer
    terms["attention"] = 4 * T * T * D * c.n_layer
    terms["norms"] = 8 * D * T * c.n_layer + 4 * D * T
  else:
    E, Rk, N, K = _mamba_dims(D, c.mamba)
    shared = D * 2 * E + E * D
    direction = E * (Rk + 2 * N) + Rk * E
    terms["matmul"] = 2 * (shared + 2 * direction) * T * c.n_layer
    terms["scan"] = 2 * SCAN_FLOPS * E * N * T * c.n_layer
    terms["conv"] = 2 * 2 * K * E * T * c.n_layer
    terms["norms"] = 4 * D * T * (c.n_layer + 1)
  terms["total"] = sum(terms.values())
  return terms


def flops(config, seq_len=None, causal_half=False):
  """Forward FLOPs per token (LMs, at `seq_len`) or per image (vision models)."""
  if isinstance(config, LMConfig):
    if not seq_len:
      raise ValueError("language-model FLOPs depend on the sequence length: pass seq_len")
    return lm_flops(config, seq_len, causal_half)
  return vision_flops(config)


# --- XLA's own count, to check the analytic one against --------------------------

def compiled_flops(compiled):
  """XLA's FLOP count of a compiled computation, per device (0 if unknown)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  return float(cost.get("flops", 0.0))


def xla_forward_flops(config, seq_len=None):
  """XLA's count for the jitted forward pass, per token (LMs) or per image."""
  graphdef, state = nnx.split(build(config, rngs=nnx.Rngs(0)))
  x = (jnp.zeros((1, seq_len), jnp.int32) if seq_len
       else jnp.zeros((1, config.image_size, config.image_size, config.channels)))
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return compiled_flops(fn.lower(state, x).compile()) / (seq_len or 1)


def xla_scan_flops(length, channels, state):
  """XLA's count for the associative scan alone, per token."""
  s = jax.ShapeDtypeStruct
  args = (s((1, length, channels), jnp.float32), s((1, length, channels), jnp.float32),
          s((channels, state), jnp.float32), s((1, length, state), jnp.float32),
          s((1, length, state), jnp.float32))
  fn = jax.jit(lambda *a: selective_scan(*a, impl="associative"))
  return compiled_flops(fn.lower(*args).compile()) / length


def xla_recurrence_flops(channels, state):
  """XLA's count (FLOPs + transcendentals) for one step of the sequential recurrence,
  per (channel, state): no loop, so nothing is counted once for many steps."""
  from ssm.scan import reference
  s = jax.ShapeDtypeStruct
  args = (s((1, channels, state), jnp.float32), s((1, channels), jnp.float32),
          s((1, channels), jnp.float32), s((channels, state), jnp.float32),
          s((1, state), jnp.float32), s((1, state), jnp.float32), s((1,), jnp.float32))
  cost = jax.jit(reference.step).lower(*args).compile().cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  return (cost.get("flops", 0.0) + cost.get("transcendentals", 0.0)) / (channels * state)


# --- matching ---------------------------------------------------------------------

FAMILIES = ("mamba", "transformer++", "hybrid", "attention", "mamba2")
SMALL = 256  # below this width attention has 4 heads


def attention_heads(d_model):
  """4 heads below width 256; from 256 up, the head count whose (even) head size in
  [32, 128] is nearest 64; None where there is none."""
  if d_model < SMALL:
    return 4 if d_model % 8 == 0 else None
  sizes = [h for h in range(1, d_model // 32 + 1) if d_model % h == 0
           and (d_model // h) % 2 == 0 and 32 <= d_model // h <= 128]
  return min(sizes, key=lambda h: abs(d_model // h - 64)) if sizes else None


def family_config(family, d_model, n_layer, vocab_size, like: LMConfig = None, d_ff=None):
  """An LM of a family at a size: "mamba", "transformer++" (SwiGLU width ~8/3
  d_model), "hybrid" (Mamba layers with one attention layer in three, "MMA";
  "MA" with two layers) or "attention" (Zoology's attention baseline: one head, no
  MLPs, the blocks sequence mixers only like Mamba's; RoPE where Zoology has learned
  positions) or "mamba2" (Mamba-2 layers, `like`'s Mamba2Config: the official one by
  default).
  Widths are multiples of 8; attention heads as `attention_heads`."""
  base = like or LMConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size)
  base = dataclasses.replace(base, d_model=d_model, n_layer=n_layer, vocab_size=vocab_size)
  small = d_model < SMALL
  heads = dataclasses.replace(base.attention, n_heads=attention_heads(d_model) or 1,
                              n_kv_heads=None, head_dim=None)
  if family == "mamba":
    return dataclasses.replace(base, pattern="M", mlp="none", d_intermediate=0)
  if family == "mamba2":
    return dataclasses.replace(base, pattern="S", mlp="none", d_intermediate=0)
  if family == "transformer++":
    step = 8 if small else 64
    d_ff = d_ff or max(step, round(8 * d_model / 3 / step) * step)
    return dataclasses.replace(base, pattern="A", mlp="swiglu", d_intermediate=d_ff,
                               attention=heads)
  if family == "hybrid":
    return dataclasses.replace(base, pattern="MMA" if n_layer >= 3 else "MA", mlp="none",
                               d_intermediate=0, attention=heads)
  if family == "attention":
    one_head = dataclasses.replace(heads, n_heads=1)
    return dataclasses.replace(base, pattern="A", mlp="none", d_intermediate=0,
                               attention=one_head)
  raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


# The usual width / depth of each family (mamba-130m: 768 / 24; Transformer++-125M: 768 / 12).
ASPECT = {"mamba": 32, "transformer++": 64, "hybrid": 32, "attention": 32, "mamba2": 32}
TOLERANCE = 0.02  # among sizes this close to the target, the usual shape wins
# The shapes papers train: width / depth within a factor ASPECT_BAND of the family's usual
# (or a reference's), Vim-Ti's 8 to GPT-3's 128 around 32; attention heads at least
# MIN_HEAD wide, unless the reference's own are narrower.
ASPECT_BAND = 4
MIN_HEAD = 16


def head_size(c):
  """The attention head size of a model (LM or ViT); None where it has no attention."""
  if isinstance(c, ViTConfig):
    return c.d_model // c.n_heads
  if isinstance(c, LMConfig) and "A" in c.layer_mixers:
    return _attn_dims(c.d_model, c.attention)[2]
  return None


def _widths(family, like=None):
  if family == "mamba2":  # where `like`'s (or the default) headdim and ngroups divide
    m = like.mamba2 if like is not None else LMConfig.__dataclass_fields__["mamba2"].default
    return [d for d in range(8, 8193, 8)
            if (m.expand * d) % m.headdim == 0 and (m.expand * d // m.headdim) % m.ngroups == 0]
  return [d for d in range(8, 8193, 8) if family == "mamba" or attention_heads(d)]


def match(family, target, *, criterion="params", seq_len=None, vocab_size, like=None,
          depth=None, aspect=None, min_head=MIN_HEAD, width=None, tolerance=TOLERANCE):
  """The size of `family` whose parameters (or training FLOPs per token at
  `seq_len`) come closest to `target`. Searches widths (multiples of 8; for Mamba-2
  those `like`'s headdim and groups divide) and depths (or only `depth`), and a
  Transformer++'s MLP width over 2-4x d_model where widths alone step too coarsely (at
  a fixed depth, or where no shape with the usual 8/3 is within `tolerance`), among the
  shapes papers train only: width / depth within a factor ASPECT_BAND of `aspect`
  (default the family's usual, ASPECT) and, where the depth is free, attention heads at
  least `min_head` wide. Among sizes within `tolerance` of the target, the best
  trade-off of closeness and nearness to `aspect`. A hybrid has at least one layer of
  each kind; `width` fixes the width (e.g. a reference's, so that attention heads stay
  64 wide). Returns (config, value, relative mismatch): a mismatch beyond `tolerance`
  means that no such shape comes closer."""
  if criterion not in ("params", "flops"):
    raise ValueError(f"criterion {criterion!r}: expected 'params' or 'flops'")
  measure = ((lambda c: lm_params(c)) if criterion == "params"
             else (lambda c: 3 * lm_flops(c, seq_len)["total"]))
  mlp_range = ((lambda d: range(2 * d, 4 * d + 1, _mlp_step(d)))
               if family == "transformer++" else None)
  return _search(lambda d, n, d_ff: family_config(family, d, n, vocab_size, like, d_ff),
                 measure, target, widths=[width] if width else _widths(family, like),
                 depths=[depth] if depth else range(1, 97), aspect=aspect or ASPECT[family],
                 min_head=min_head, mlp_range=mlp_range, usual_mlp=lambda d: 8 * d / 3,
                 min_layers=2 if family == "hybrid" else 1, tolerance=tolerance, what=family)


def _mlp_step(d_model):
  return 8 if d_model < SMALL else 64


def _search(make, measure, target, *, widths, depths, aspect, min_head, mlp_range=None,
            usual_mlp=None, min_layers=1, tolerance=TOLERANCE, what=""):
  """The search `match` and `match_vision` share. `make(d_model, n_layer, d_ff)` builds a
  config (d_ff None: the family's own MLP width), `measure` its size; `mlp_range(d)`
  the MLP widths also tried (at a fixed depth always; at a free depth only where the
  family's own MLP gives no match within `tolerance`), `usual_mlp(d)` the family's own,
  which the shape term measures them from. Only the shapes papers train are taken:
  width / depth within a factor ASPECT_BAND of `aspect` and, where the depth is free,
  two layers at least and attention heads at least `min_head` wide (at a fixed depth
  the target leaves the width). Among them, within `tolerance` of the target, the best trade-off of shape
  (where the depth is free, the distance from `aspect`) and closeness (1% of error ~ a
  1.6x aspect); else the closest. Returns (config, value, mismatch); a ValueError where
  no shape qualifies."""
  free = len(depths) > 1

  def best_of(mlps):
    best = None
    for n_layer in depths:
      if n_layer < (max(2, min_layers) if free else min_layers):
        continue  # a free depth: two layers at least, as every comparison trains
      if measure(make(widths[0], n_layer, None)) > 2 * target:
        break  # deeper is only bigger
      for d in widths:
        ratio = math.log(d / (aspect * n_layer))
        if ratio < -math.log(ASPECT_BAND):
          continue
        if ratio > math.log(ASPECT_BAND):
          break
        c = make(d, n_layer, None)
        if free and (head_size(c) or min_head) < min_head:
          continue
        for d_ff in mlps(d):
          c = make(d, n_layer, d_ff)
          value = measure(c)
          err = abs(value - target) / target
          shape = abs(ratio) if free else 0.0
          if d_ff:
            shape += abs(math.log(c.d_intermediate / usual_mlp(d)))
          key = (0, shape + 50 * err) if err <= tolerance else (1, err)
          if best is None or key < best[0]:
            best = (key, c, value, (value - target) / target)
        if value > 2 * target:
          break
    return best

  own = lambda d: [None]
  best = best_of(mlp_range if mlp_range and not free else own)
  if mlp_range and free and (best is None or best[0][0]):
    best = best_of(mlp_range)
  if best is None:
    depth = "any depth" if free else f"{depths[0]} layers"
    raise ValueError(f"{what}: no shape at {depth} has width / depth within "
                     f"{aspect / ASPECT_BAND:.3g}-{aspect * ASPECT_BAND:.3g}"
                     + (f" and attention heads at least {min_head} wide" if free else "")
                     + " (the shapes papers train)")
  _, c, value, mismatch = best
  return c, value, mismatch


# --- matching vision families -------------------------------------------------------

VISION_FAMILIES = ("vit", "vit+reg", "vim", "vim+reg")
# The usual width / depth: ViT-S/16 384 / 12, Vim-S 384 / 24 (Vim runs twice ViT's depth).
VISION_ASPECT = {"vit": 32, "vit+reg": 32, "vim": 16, "vim+reg": 16}
REGISTERS = 4  # Darcet et al.'s default (and DINOv2-with-registers')


def vision_config(family, d_model, n_layer, like=None, d_ff=None, registers=REGISTERS):
  """A vision model of a family at a size, on `like`'s images (an ImageConfig: image and
  patch size, channels, classes, and a VimConfig's Mamba settings): "vit" (MLP 4x
  d_model, heads as `attention_heads`, no registers), "vit+reg" (the same with
  `registers` register tokens), "vim" (bidirectional Mamba, d_state 16 unless `like` is
  a Vision Mamba) and "vim+reg". Widths are multiples of 8."""
  from ssm.models.vim import VimConfig
  if family not in VISION_FAMILIES:
    raise ValueError(f"unknown vision family {family!r}; known: {', '.join(VISION_FAMILIES)}")
  image = {k: getattr(like, k) for k in ("image_size", "patch_size", "channels", "num_classes",
                                         "dtype")} if like is not None else {}
  R = registers if family.endswith("+reg") else 0
  if family.startswith("vit"):
    extra = ({k: getattr(like, k) for k in ("pool", "layer_scale", "norm_eps", "qkv_bias")}
             if isinstance(like, ViTConfig) else {})
    heads = attention_heads(d_model)
    if heads is None:
      raise ValueError(f"d_model {d_model}: no attention head count fits (widths are "
                       "multiples of 8; from 256 up, heads 32-128 wide)")
    return ViTConfig(d_model=d_model, n_layer=n_layer, n_heads=heads,
                     d_intermediate=d_ff or 4 * d_model, num_registers=R, **image, **extra)
  from ssm.layers import MambaConfig
  mamba = like.mamba if isinstance(like, VimConfig) else MambaConfig(d_state=16)
  return VimConfig(d_model=d_model, n_layer=n_layer, num_registers=R, mamba=mamba, **image)


def vision_params(c):
  """ViTConfig / VimConfig's exact parameter count, in closed form (tested equal)."""
  D, P, p = c.d_model, c.grid**2, c.patch_size
  total = p * p * c.channels * D + D  # the patch embedding
  total += D * (1 + c.num_registers) + (1 + P) * D  # class, registers, positions
  total += (D * c.num_classes + c.num_classes) if c.num_classes else 0
  if isinstance(c, ViTConfig):
    F = c.d_intermediate
    layer = 4 * D + 4 * D * D + 4 * D * c.qkv_bias + 2 * D * F + F + D
    layer += 2 * D * (c.layer_scale is not None)
    return total + c.n_layer * layer + 2 * D
  E, Rk, N, K = _mamba_dims(D, c.mamba)
  m = c.mamba
  direction = K * E + E * m.conv_bias + E * (Rk + 2 * N) + Rk * E + E + E * N + E
  layer = D + D * 2 * E + E * D + (2 * E + D) * m.bias + 2 * direction
  return total + c.n_layer * layer + D


def _vision_widths(family):
  return [d for d in range(8, 8193, 8) if family.startswith("vim") or attention_heads(d)]


def match_vision(family, target, *, criterion="params", like=None, depth=None, aspect=None,
                 min_head=MIN_HEAD, width=None, registers=REGISTERS, tolerance=TOLERANCE):
  """The size of a vision `family` whose parameters (or training FLOPs per image, 3x
  the forward) come closest to `target`, on `like`'s images; the search and the
  choice as `match`'s: widths (multiples of 8) and depths (or only `depth`), a ViT's
  MLP width over 2-6x d_model where widths alone step too coarsely, width / depth
  within a factor ASPECT_BAND of `aspect` (default the family's usual, VISION_ASPECT)
  and heads at least `min_head` wide; among sizes within `tolerance`, the best
  trade-off of closeness and nearness to `aspect`. Returns (config, value, relative
  mismatch)."""
  if criterion not in ("params", "flops"):
    raise ValueError(f"criterion {criterion!r}: expected 'params' or 'flops'")
  if family not in VISION_FAMILIES:
    raise ValueError(f"unknown vision family {family!r}; known: {', '.join(VISION_FAMILIES)}")
  measure = (vision_params if criterion == "params"
             else (lambda c: 3 * vision_flops(c)["total"]))
  mlp_range = ((lambda d: range(2 * d, 6 * d + 1, _mlp_step(d)))
               if family.startswith("vit") else None)
  return _search(lambda d, n, d_ff: vision_config(family, d, n, like, d_ff, registers),
                 measure, target, widths=[width] if width else _vision_widths(family),
                 depths=[depth] if depth else range(1, 97),
                 aspect=aspect or VISION_ASPECT[family], min_head=min_head, mlp_range=mlp_range,
                 usual_mlp=lambda d: 4 * d, tolerance=tolerance, what=family)
