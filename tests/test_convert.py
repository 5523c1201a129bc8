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
