"""Conversion from timm / official weights, parity with PyTorch, Orbax round trip, bad input.

Fixtures come from tests/fixtures/make_deit_fixtures.py (timm, random init, reduced size)."""
import os
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deit_jax import checkpoint, convert, models

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
SMALL = dict(embed_dim=48, num_heads=3, depth=2, num_classes=10)
NAMES = {"plain": "deit_tiny_patch16_224", "distilled": "deit_tiny_distilled_patch16_224"}


def _convert(tmp_path, variant, **overrides):
  out = str(tmp_path / f"{variant}{overrides.get('img_size', '')}")
  convert.convert(NAMES[variant], os.path.join(FIX, f"deit_{variant}.safetensors"), out,
                  **{**SMALL, "img_size": 32, **overrides})
  return out


@pytest.mark.parametrize("variant", ["plain", "distilled"])
def test_parity_with_timm(tmp_path, variant):
  model = checkpoint.load_model(_convert(tmp_path, variant))
  io = np.load(os.path.join(FIX, f"deit_{variant}_io.npz"))
  np.testing.assert_allclose(np.asarray(model(io["images"])), io["logits"], atol=1e-4, rtol=0)


def test_parity_at_a_new_resolution(tmp_path):
  """Loading 32 px weights into a 48 px model resizes the position grid like the official code."""
  io = np.load(os.path.join(FIX, "deit_distilled_48px_io.npz"))
  resized_on_load = checkpoint.load_model(_convert(tmp_path, "distilled"), img_size=48)
  converted_at_48 = checkpoint.load_model(_convert(tmp_path, "distilled", img_size=48))
  for model in (resized_on_load, converted_at_48):
    np.testing.assert_allclose(np.asarray(model(io["images"])), io["logits"], atol=1e-4, rtol=0)


def test_round_trip_gives_identical_logits(tmp_path):
  model = models.create_model(NAMES["distilled"], img_size=32, **SMALL)
  model.eval()
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  checkpoint.save_model(model, str(tmp_path / "ckpt"))
  restored = checkpoint.load_model(str(tmp_path / "ckpt"))
  assert isinstance(restored, models.DeiT) and restored.config == model.config
  np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))


def test_existing_checkpoint_is_never_overwritten(tmp_path):
  out = _convert(tmp_path, "plain")
  with pytest.raises(checkpoint.CheckpointError, match="already holds"):
    _convert(tmp_path, "plain")
  io = np.load(os.path.join(FIX, "deit_plain_io.npz"))
  np.testing.assert_allclose(np.asarray(checkpoint.load_model(out)(io["images"])), io["logits"],
                             atol=1e-4)


def test_converter_cli(tmp_path):
  import subprocess
  out = tmp_path / "cli"
  # The CLI has no flags for depth/width, so convert the 32 px tiny head-only mismatch case:
  r = subprocess.run([sys.executable, "-m", "deit_jax.convert", "--model", NAMES["plain"],
                      "--checkpoint", os.path.join(FIX, "deit_plain.safetensors"),
                      "--output", str(out)], capture_output=True, text=True)
  assert r.returncode != 0
  assert "nothing was loaded" in r.stderr and "blocks/2/attn/qkv/kernel" in r.stderr
  assert not out.exists() or not any(out.iterdir())


def test_wrong_keys_list_offenders_and_load_nothing(tmp_path):
  sd = load_file(os.path.join(FIX, "deit_distilled.safetensors"))
  sd.pop("head_dist.bias")
  sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
  sd["head.weight"] = np.zeros((11, 48), np.float32)
  bad = str(tmp_path / "bad.safetensors")
  save_file(sd, bad)
  model = models.create_model(NAMES["distilled"], img_size=32, **SMALL)
  before = np.asarray(model.head.kernel[...]).copy()
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.assign_params(model, convert.deit_params_from_torch(load_file(bad)))
  msg = str(e.value)
  assert "head_dist/bias" in msg and "blocks/0/attn/extra" in msg and "head/kernel" in msg
  np.testing.assert_array_equal(model.head.kernel[...], before)
  with pytest.raises(checkpoint.CheckpointError):
    convert.convert(NAMES["distilled"], bad, str(tmp_path / "out"), img_size=32, **SMALL)
  assert not (tmp_path / "out").exists()


def test_truncated_and_foreign_files(tmp_path):
  src = os.path.join(FIX, "deit_plain.safetensors")
  truncated = tmp_path / "trunc.safetensors"
  truncated.write_bytes(open(src, "rb").read()[:5000])
  with pytest.raises(checkpoint.CheckpointError, match="truncated"):
    convert.read_torch_weights(str(truncated))
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  with pytest.raises(checkpoint.CheckpointError, match="unknown checkpoint format"):
    convert.read_torch_weights(str(text))
  with pytest.raises(FileNotFoundError):
    convert.read_torch_weights(str(tmp_path / "missing.safetensors"))


def test_pth_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
  pth = tmp_path / "w.pth"
  pth.write_bytes(b"PK\x03\x04 not really")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match="pip install torch"):
    convert.read_torch_weights(str(pth))


def test_not_a_checkpoint_directory(tmp_path):
  with pytest.raises(FileNotFoundError):
    checkpoint.load_model(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="no Orbax checkpoint"):
    checkpoint.load_model(str(tmp_path / "empty"))


def test_unknown_model_name(tmp_path):
  with pytest.raises(ValueError, match="Known DeiT models"):
    convert.convert("vit_giant", os.path.join(FIX, "deit_plain.safetensors"), str(tmp_path / "x"))
