"""ssm.flops: closed-form parameter counts equal the built models'; analytic FLOPs
against XLA's own count; matching within 2%."""

import dataclasses

import pytest

from ssm.flops import (SCAN_FLOPS, family_config, flops, lm_flops, lm_params, match,
                       param_count, xla_forward_flops, xla_recurrence_flops, xla_scan_flops)
from ssm.layers import MambaConfig
from ssm.layers.attention import AttentionConfig
from ssm.models import PRESETS, LMConfig, VimConfig, ViTConfig, get_preset

ASSOC = MambaConfig(scan_impl="associative")  # no while loop: XLA counts every step


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if isinstance(c, LMConfig)])
def test_closed_form_parameter_count_equals_the_model(name):
  assert lm_params(PRESETS[name]) == param_count(PRESETS[name])


def test_closed_form_for_odd_configs():
  for c in [family_config("hybrid", 192, 5, 1001),
            LMConfig(d_model=48, n_layer=3, vocab_size=77, pattern="MAM", mlp="gelu",
                     d_intermediate=100, norm="layer", tie_embeddings=False,
                     attention=AttentionConfig(n_heads=4, n_kv_heads=2, bias=True),
                     mamba=MambaConfig(d_state=5, dt_rank=3, bias=True, conv_bias=False))]:
    assert lm_params(c) == param_count(c)


L = 256


@pytest.mark.parametrize("config,tol", [
    (family_config("transformer++", 256, 2, 1000), 0.02),
    (dataclasses.replace(get_preset("gpt2-small"), d_model=256, n_layer=2, d_intermediate=1024,
                         max_position_embeddings=L,
                         attention=AttentionConfig(n_heads=4, bias=True, rope=False)), 0.02),
], ids=["transformer++", "gpt2"])
def test_attention_lms_match_xla(config, tol):
  """Matmuls and attention are nearly all of it; XLA adds the softmax, norms and
  activations element by element (under 2% here)."""
  analytic, xla = flops(config, L)["total"], xla_forward_flops(config, L)
  assert abs(xla - analytic) / analytic < tol, (analytic, xla)


def test_vit_matches_xla():
  """Within 10%: XLA also counts the softmax over T^2 scores per head (~5 FLOPs per
  score) and the GELUs, which the analytic count leaves out."""
  c = ViTConfig(image_size=64, patch_size=8, d_model=128, n_layer=2, n_heads=4,
                d_intermediate=512, num_registers=4, num_classes=10)
  analytic, xla = flops(c)["total"], xla_forward_flops(c)
  assert abs(xla - analytic) / analytic < 0.10, (analytic, xla)


@pytest.mark.parametrize("family", ["mamba", "hybrid", "vim"])
def test_scan_models_match_xla_once_the_scan_is_set_apart(family):
  """The difference is the scan. The analytic count is the sequential recurrence's
  ~9 FLOPs per (token, channel, state); XLA counts the associative scan it compiles,
  whose log-depth composition of affine maps does several times that work. With
  XLA's own count of the scan put in for the analytic scan term, the rest agrees
  within 5%; the scan ratio itself is asserted to be what it is."""
  if family == "vim":
    c = VimConfig(image_size=64, patch_size=8, d_model=128, n_layer=2, num_registers=2,
                  num_classes=10, mamba=ASSOC)
    analytic, xla, T = flops(c), xla_forward_flops(c), 1 + 2 + 64
    E, N = 256, 16
    scan_xla = 2 * xla_scan_flops(T, E, N) * T * c.n_layer
  else:
    c = dataclasses.replace(family_config(family, 256, 3, 1000), mamba=ASSOC)
    analytic, xla = flops(c, L), xla_forward_flops(c, L)
    E, N = 512, 16
    scan_xla = xla_scan_flops(L, E, N) * c.layer_mixers.count("M")
  rest = analytic["total"] - analytic["scan"]
  assert abs((xla - scan_xla) - rest) / rest < 0.05, (xla, scan_xla, rest)
  assert 2 < scan_xla / analytic["scan"] < 10  # parallel scan: more work than 9 per element


@pytest.mark.parametrize("channels,state", [(64, 16), (256, 64)])
def test_the_scan_term_is_xlas_count_of_the_recurrence(channels, state):
  """SCAN_FLOPS (9 per token, channel and state: the official mamba_ssm count) against
  XLA's count of one recurrence step, where no loop hides work: XLA counts 8 (exp as
  one transcendental, delta * u once per channel, the reset mask's multiply)."""
  xla = xla_recurrence_flops(channels, state)
  assert abs(xla - SCAN_FLOPS) / SCAN_FLOPS <= 0.125, xla


def test_causal_half_and_training():
  c = family_config("transformer++", 256, 2, 1000)
  full, half = lm_flops(c, 1024), lm_flops(c, 1024, causal_half=True)
  assert half["attention"] * 2 == full["attention"] == 2 * 4 * 1024 * 256
  assert full["scan"] == 0 and lm_flops(family_config("mamba", 256, 2, 1000), 1024)["scan"] == \
      2 * SCAN_FLOPS * 512 * 16


@pytest.mark.parametrize("reference", ["mamba-130m", "mamba-370m", "mamba-1.4b"])
@pytest.mark.parametrize("criterion", ["params", "flops"])
def test_matching_within_two_percent(reference, criterion):
  ref = PRESETS[reference]
  target = (lm_params(ref) if criterion == "params" else 3 * lm_flops(ref, 2048)["total"])
  for family in ("mamba", "transformer++", "hybrid"):
    config, value, mismatch = match(family, target, criterion=criterion, seq_len=2048,
                                    vocab_size=ref.vocab_size)
    assert abs(mismatch) <= 0.02, (family, config.d_model, config.n_layer, mismatch)
    assert config.d_model % 8 == 0
    if family != "mamba":
      assert config.d_model % config.attention.n_heads == 0
    exact = lm_params(config) if criterion == "params" else 3 * lm_flops(config, 2048)["total"]
    assert exact == value


@pytest.mark.parametrize("headdim", [48, 8])
def test_mamba2_matching_takes_likes_headdim(headdim):
  """The widths searched are those `like`'s headdim divides: 48 (not a divisor of the
  default's widths) matches, and 8 finds widths that are not multiples of 32."""
  from ssm.layers.mamba2 import Mamba2Config
  like = LMConfig(d_model=48, n_layer=2, vocab_size=256, pattern="S",
                  mamba2=Mamba2Config(d_state=16, headdim=headdim))
  width = 72 if headdim == 48 else 40
  target = family_config("mamba2", width, 2, 256, like)
  config, value, mismatch = match("mamba2", lm_params(target), vocab_size=256, like=like,
                                  depth=2)
  assert (config.d_model, config.mamba2.headdim, mismatch) == (width, headdim, 0.0)


# --- vision families ------------------------------------------------------------------

from ssm.flops import (VISION_FAMILIES, match_vision, vision_config,  # noqa: E402
                       vision_flops, vision_params)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_vision_closed_form_parameter_count_equals_the_model(family):
  like = ViTConfig(image_size=32, patch_size=4, channels=3, num_classes=10)
  for d_model, n_layer in [(64, 2), (264, 3)]:
    c = vision_config(family, d_model, n_layer, like)
    assert c.num_registers == (4 if family.endswith("+reg") else 0)
    assert (c.image_size, c.patch_size, c.channels, c.num_classes) == (32, 4, 3, 10)
    assert vision_params(c) == param_count(c)


def test_vision_closed_form_for_odd_configs():
  like = ViTConfig(image_size=32, patch_size=8, channels=1, num_classes=0)
  for c in [dataclasses.replace(vision_config("vit+reg", 48, 2, like), layer_scale=1.0,
                                qkv_bias=False),
            VimConfig(image_size=32, patch_size=8, d_model=40, n_layer=3, num_registers=2,
                      mamba=MambaConfig(d_state=5, dt_rank=3, bias=True, conv_bias=False)),
            get_preset("vim-tiny"), get_preset("vit-b16-reg4")]:
    assert vision_params(c) == param_count(c)


@pytest.mark.parametrize("reference", ["vit-ti16", "vit-s16", "vit-b16"])
@pytest.mark.parametrize("criterion", ["params", "flops"])
def test_vision_matching_within_two_percent(reference, criterion):
  """Every vision family at three reference sizes, on parameters or training FLOPs
  per image; the images (size, patch, channels, classes) are the reference's."""
  ref = PRESETS[reference]
  measure = (vision_params if criterion == "params"
             else (lambda c: 3 * vision_flops(c)["total"]))
  target = measure(ref)
  for family in VISION_FAMILIES:
    config, value, mismatch = match_vision(family, target, criterion=criterion, like=ref)
    assert abs(mismatch) <= 0.02, (family, config.d_model, config.n_layer, mismatch)
    assert config.d_model % 8 == 0 and measure(config) == value
    assert (config.image_size, config.patch_size, config.num_classes) == (224, 16, 1000)
    assert config.num_registers == (4 if family.endswith("+reg") else 0)
    if family.startswith("vit"):
      assert config.d_model % config.n_heads == 0
  # at the reference's own depth a ViT+registers still matches (its MLP width free)
  config, _, mismatch = match_vision("vit+reg", target, criterion=criterion, like=ref,
                                     depth=ref.n_layer)
  assert config.n_layer == ref.n_layer and abs(mismatch) <= 0.02


def test_vision_matching_bad_input():
  with pytest.raises(ValueError, match="unknown vision family 'vit-reg'"):
    match_vision("vit-reg", 1e6)
  with pytest.raises(ValueError, match="criterion 'tokens'"):
    match_vision("vit", 1e6, criterion="tokens")
