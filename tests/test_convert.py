"""ssm.convert.load_hf against transformers' own models (torch, CPU, float32)."""

import json

import numpy as np
import pytest

from conftest import require


@pytest.fixture(scope="module")
def hf_mamba(tmp_path_factory):
  """A random small MambaForCausalLM, every parameter perturbed so that no
  constant initialisation (D = 1, A_log = log n) can hide a mapping error."""
  torch = require("torch")
  transformers = require("transformers")
  torch.manual_seed(0)
  config = transformers.MambaConfig(
      vocab_size=104, hidden_size=48, state_size=7, num_hidden_layers=3, expand=2,
      conv_kernel=4, time_step_rank=5, use_conv_bias=True, use_bias=False)
  model = transformers.MambaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "lm_head.weight":  # tied to the embedding
        p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("mamba")
  model.save_pretrained(path)
  return model, path


def test_mamba_logits_match_transformers(hf_mamba):
  torch = require("torch")
  from ssm.convert import load_hf
  hf_model, path = hf_mamba
  ids = np.random.default_rng(0).integers(0, 104, size=(2, 19))
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
  model = load_hf(path)
  for impl in ("reference", "chunked"):
    logits = np.asarray(load_hf(path, scan_impl=impl)(ids))
    assert logits.shape == expected.shape == (2, 19, 104)
    err = np.abs(logits - expected).max() / np.abs(expected).max()
    assert err < 1e-4, f"{impl}: relative error {err:.2e}"
  # decoding from the imported model gives the same logits as the full pass
  logits, cache = model(ids[:, :10], return_cache=True)
  for t in range(10, 19):
    step_logits, cache = model.step(ids[:, t], cache)
    err = np.abs(np.asarray(step_logits) - expected[:, t]).max() / np.abs(expected).max()
    assert err < 1e-4, f"decode step {t}: relative error {err:.2e}"


def test_bad_checkpoints_get_clear_errors(hf_mamba, tmp_path):
  from ssm.convert import load_hf
  _, path = hf_mamba
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf(tmp_path)
  bad = tmp_path / "gpt"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
    load_hf(bad)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    load_hf(empty)
  with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
    load_hf(tmp_path / "missing")


def test_hub_names_go_through_snapshot_download(hf_mamba, monkeypatch):
  """No network here: the hub fetch is replaced by the local checkpoint, which
  exercises the same resolution code a connected machine runs."""
  huggingface_hub = require("huggingface_hub")
  from ssm.convert import load_hf
  _, path = hf_mamba
  calls = []

  def fake_snapshot_download(name, revision=None, allow_patterns=None):
    calls.append((name, revision, tuple(allow_patterns)))
    return str(path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  model = load_hf("state-spaces/mamba-130m-hf")
  assert calls == [("state-spaces/mamba-130m-hf", None, ("*.json", "*.safetensors"))]
  assert model(np.zeros((1, 3), np.int32)).shape == (1, 3, 104)


def _save(tmp_path_factory, name, model):
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path)
  return path


def _perturb(model, torch, skip=("lm_head.weight",)):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name not in skip:
        p.add_(0.05 * torch.randn_like(p))
  return model


def _check_lm_parity(hf_model, path, vocab, torch, length=17):
  from ssm.convert import load_hf
  ids = np.random.default_rng(1).integers(0, vocab, size=(2, length))
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
  model = load_hf(path)
  logits = np.asarray(model(ids))
  err = np.abs(logits - expected).max() / np.abs(expected).max()
  assert logits.shape == expected.shape and err < 1e-4, f"relative error {err:.2e}"
  # KV-cache decoding from the imported model gives the full pass's logits
  logits, cache = model(ids[:, :9], return_cache=True, max_length=length)
  for t in range(9, length):
    step_logits, cache = model.step(ids[:, t], cache)
    err = np.abs(np.asarray(step_logits) - expected[:, t]).max() / np.abs(expected).max()
    assert err < 1e-4, f"decode step {t}: relative error {err:.2e}"


def test_gpt2_logits_match_transformers(tmp_path_factory):
  torch, transformers = require("torch"), require("transformers")
  torch.manual_seed(1)
  config = transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=48, n_layer=2,
                                   n_head=4)
  model = _perturb(transformers.GPT2LMHeadModel(config).eval(), torch)
  _check_lm_parity(model, _save(tmp_path_factory, "gpt2", model), 99, torch)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_logits_match_transformers(tmp_path_factory, tied):
  torch, transformers = require("torch"), require("transformers")
  torch.manual_seed(2)
  config = transformers.LlamaConfig(
      vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-5, tie_word_embeddings=tied)
  skip = ("lm_head.weight",) if tied else ()
  model = _perturb(transformers.LlamaForCausalLM(config).eval(), torch, skip)
  _check_lm_parity(model, _save(tmp_path_factory, "llama", model), 101, torch)


def _relative_error(actual, expected):
  return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def _images(torch, size, seed=0):
  x = np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)
  return x, torch.tensor(x.transpose(0, 3, 1, 2))  # ssm is NHWC, torch NCHW


@pytest.mark.parametrize("classifier", [False, True])
def test_vit_matches_transformers(tmp_path_factory, classifier):
  torch, transformers = require("torch"), require("transformers")
  from ssm.convert import load_hf
  torch.manual_seed(3)
  config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=80, num_labels=7)
  cls = transformers.ViTForImageClassification if classifier else transformers.ViTModel
  hf_model = _perturb(cls(config).eval(), torch, skip=())
  path = _save(tmp_path_factory, "vit", hf_model)
  x, pixels = _images(torch, 32)
  with torch.no_grad():
    out = hf_model(pixels, output_hidden_states=True)
    hidden = out.hidden_states[-1] if classifier else out.last_hidden_state
    if classifier:  # the classifier's input is the final-normed sequence
      hidden = hf_model.vit.layernorm(hidden)
  model = load_hf(path)
  assert _relative_error(model.features(x)["tokens"], hidden.numpy()) < 1e-4
  if classifier:
    assert _relative_error(model(x), out.logits.numpy()) < 1e-4


def test_dinov2_with_registers_matches_transformers(tmp_path_factory):
  torch, transformers = require("torch"), require("transformers")
  from safetensors.numpy import load_file, save_file

  from ssm.convert import load_hf
  torch.manual_seed(4)
  config = transformers.Dinov2WithRegistersConfig(
      image_size=28, patch_size=7, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_register_tokens=4, layerscale_value=0.5)
  hf_model = _perturb(transformers.Dinov2WithRegistersModel(config).eval(), torch, skip=())
  path = _save(tmp_path_factory, "dinov2", hf_model)
  x, pixels = _images(torch, 28, seed=1)
  with torch.no_grad():
    expected = hf_model(pixels).last_hidden_state.numpy()
  features = load_hf(path).features(x)
  assert features["tokens"].shape == (2, 1 + 4 + 16, 48)
  assert _relative_error(features["tokens"], expected) < 1e-4
  assert _relative_error(features["registers"], expected[:, 1:5]) < 1e-4
  # the same checkpoint with transformers 4.x tensor names
  old = tmp_path_factory.mktemp("dinov2_4x")
  (old / "config.json").write_text((path / "config.json").read_text())
  renames = {".attention.q_proj.": ".attention.attention.query.",
             ".attention.k_proj.": ".attention.attention.key.",
             ".attention.v_proj.": ".attention.attention.value.",
             ".attention.o_proj.": ".attention.output.dense.",
             ".mlp.fc1.": ".intermediate.dense.", ".mlp.fc2.": ".output.dense."}
  tensors = {}
  for name, w in load_file(str(path / "model.safetensors")).items():
    for new, older in renames.items():
      name = name.replace(new, older)
    tensors[name] = w
  assert "encoder.layer.0.attention.attention.query.weight" in tensors
  save_file(tensors, str(old / "model.safetensors"))
  assert _relative_error(load_hf(old).features(x)["tokens"], expected) < 1e-4
