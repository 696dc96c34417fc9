"""Conversion from timm / official weights, parity with PyTorch, Orbax round trip, bad input.

Fixtures come from tests/fixtures/make_deit_fixtures.py (timm, random init, reduced size)."""
import dataclasses
import hashlib
import json
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


# ---------------------------------------------------------------------------------------------
# DeiT III (timm's deit3_*: LayerScale, pos_embed on the patches only).
# ---------------------------------------------------------------------------------------------
DEIT3 = {"plain": "deit3_small_patch16_224", "distilled": "deit3_small_patch16_224"}


def _convert_deit3(tmp_path, variant, path=None, **overrides):
  out = str(tmp_path / f"deit3_{variant}{overrides.get('img_size', '')}")
  convert.convert(DEIT3[variant], path or os.path.join(FIX, f"deit3_{variant}.safetensors"), out,
                  **{**SMALL, "img_size": 32, "distilled": variant == "distilled", **overrides})
  return out


@pytest.mark.parametrize("variant", ["plain", "distilled"])
def test_deit3_parity_with_timm(tmp_path, variant):
  model = checkpoint.load_model(_convert_deit3(tmp_path, variant))
  assert model.config.no_embed_class and model.config.layer_scale_init is not None
  io = np.load(os.path.join(FIX, f"deit3_{variant}_io.npz"))
  np.testing.assert_allclose(np.asarray(model(io["images"])), io["logits"], atol=1e-4, rtol=0)


def test_deit3_parity_at_a_new_resolution(tmp_path):
  """Every pos_embed row is a patch row (no prefix rows), so all of them are resized."""
  io = np.load(os.path.join(FIX, "deit3_plain_48px_io.npz"))
  model = checkpoint.load_model(_convert_deit3(tmp_path, "plain"), img_size=48)
  assert model.pos_embed.shape == (1, 9, 48)
  np.testing.assert_allclose(np.asarray(model(io["images"])), io["logits"], atol=1e-4, rtol=0)


def test_deit3_official_release_names(tmp_path):
  """The official DeiT III .pth names LayerScale `blocks.i.gamma_1/2` (timm: `ls1/ls2.gamma`)."""
  sd = load_file(os.path.join(FIX, "deit3_plain.safetensors"))
  sd = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
        for k, v in sd.items()}
  assert "blocks.0.gamma_1" in sd
  path = str(tmp_path / "official.safetensors")
  save_file(sd, path)
  model = checkpoint.load_model(_convert_deit3(tmp_path, "plain", path))
  io = np.load(os.path.join(FIX, "deit3_plain_io.npz"))
  np.testing.assert_allclose(np.asarray(model(io["images"])), io["logits"], atol=1e-4, rtol=0)


def test_deit3_round_trip_keeps_the_architecture(tmp_path):
  model = models.create_model("deit3_small_patch16_224", distilled=True, img_size=32, **SMALL)
  model.eval()
  checkpoint.save_model(model, str(tmp_path / "ckpt"))
  restored = checkpoint.load_model(str(tmp_path / "ckpt"))
  assert restored.config == model.config
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))


def test_deit3_weights_into_a_deit_model_and_back_are_refused(tmp_path):
  out = tmp_path / "wrong"
  with pytest.raises(checkpoint.CheckpointError, match=r"DeiT III .* target model is a DeiT "
                     r"\(no LayerScale.*deit3_"):
    convert.convert(NAMES["plain"], os.path.join(FIX, "deit3_plain.safetensors"), str(out),
                    img_size=32, **SMALL)
  assert not out.exists()
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint is a DeiT \(no LayerScale"
                     r".*target model is a DeiT III.*deit_\*"):
    convert.convert(DEIT3["plain"], os.path.join(FIX, "deit_plain.safetensors"), str(out),
                    img_size=32, **SMALL)
  assert not out.exists()
  # Fine-tuning / loading: the same refusal from a stored DeiT III checkpoint.
  stored = _convert_deit3(tmp_path, "plain")
  deit = models.create_model(NAMES["plain"], img_size=32, **SMALL)
  with pytest.raises(checkpoint.CheckpointError, match="DeiT III"):
    checkpoint.assign_params(deit, checkpoint.model_params(checkpoint.load_model(stored)))


def test_position_embedding_without_prefix_rows_into_a_model_with_them(tmp_path):
  sd = convert.deit_params_from_torch(load_file(os.path.join(FIX, "deit3_plain.safetensors")))
  model = models.create_model(DEIT3["plain"], no_embed_class=False, img_size=32, **SMALL)
  with pytest.raises(checkpoint.CheckpointError, match="no_embed_class=True"):
    checkpoint.assign_params(model, sd)


def test_unrebuildable_description_is_a_clear_error():
  desc = {"family": "deit", "config": {**dataclasses.asdict(models.MODELS[DEIT3["plain"]]),
                                       "rotary": True}}
  with pytest.raises(checkpoint.CheckpointError, match=r"Cannot rebuild.*\['rotary'\]"):
    checkpoint.build_model(desc)
  with pytest.raises(checkpoint.CheckpointError, match="Unknown model family"):
    checkpoint.build_model({"family": "swin"})


# ---------------------------------------------------------------------------------------------
# A local Hugging Face hub cache, built here in the hub's layout (blobs + snapshot symlinks).
# ---------------------------------------------------------------------------------------------
HF_ID = "timm/deit3_small_patch16_224.fb_in1k"


def _hf_cache(root, repo_id=HF_ID, weights="deit3_plain.safetensors", config=None,
              commit="0123456789abcdef0123456789abcdef01234567"):
  repo = root / ("models--" + repo_id.replace("/", "--"))
  (repo / "blobs").mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  snap = repo / "snapshots" / commit
  snap.mkdir(parents=True)
  config = config or {
      "architecture": "deit3_small_patch16_224", "num_classes": 10, "num_features": 48,
      "global_pool": "token", "model_args": {"img_size": 32, "embed_dim": 48, "depth": 2,
                                             "num_heads": 3},
      "pretrained_cfg": {"tag": "fb_in1k", "input_size": [3, 32, 32], "crop_pct": 0.9}}
  files = {"model.safetensors": open(os.path.join(FIX, weights), "rb").read(),
           "config.json": json.dumps(config).encode()}
  for name, blob in files.items():
    digest = hashlib.sha256(blob).hexdigest()
    (repo / "blobs" / digest).write_bytes(blob)
    (snap / name).symlink_to(os.path.join("..", "..", "blobs", digest))
  return root


def _run_convert(*args, env=None):
  import subprocess
  return subprocess.run([sys.executable, "-m", "deit_jax.convert", *args], capture_output=True,
                        text=True, env={**os.environ, **(env or {})})


def test_hf_cache_conversion_cli(tmp_path):
  home = tmp_path / "hf_home"
  _hf_cache(home / "hub")
  out = tmp_path / "from_hf"
  # An empty HF_HUB_CACHE counts as unset, as in huggingface_hub.
  r = _run_convert("--hf", HF_ID, "--output", str(out),
                   env={"HF_HOME": str(home), "HF_HUB_CACHE": "", "HF_HUB_OFFLINE": "1"})
  assert r.returncode == 0, r.stderr
  model = checkpoint.load_model(str(out))
  assert model.config.layer_scale_init is not None and model.config.num_classes == 10
  io = np.load(os.path.join(FIX, "deit3_plain_io.npz"))
  np.testing.assert_allclose(np.asarray(model(io["images"])), io["logits"], atol=1e-4, rtol=0)


def test_hf_cache_honours_hf_hub_cache_and_revisions(tmp_path, monkeypatch):
  commit = "fedcba9876543210fedcba9876543210fedcba98"
  _hf_cache(tmp_path / "cache", commit=commit)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
  weights, config, found = convert.find_in_hf_cache(HF_ID)
  assert found == commit and weights.endswith("model.safetensors")
  assert config["architecture"] == "deit3_small_patch16_224"
  assert convert.find_in_hf_cache(HF_ID, revision=commit)[2] == commit
  with pytest.raises(convert.NotCachedError, match="--revision v2"):
    convert.find_in_hf_cache(HF_ID, revision="v2")


def test_hf_model_missing_from_the_cache(tmp_path):
  (tmp_path / "hub").mkdir()
  out = tmp_path / "out"
  repo = "timm/deit_base_distilled_patch16_224.fb_in1k"
  r = _run_convert("--hf", repo, "--output", str(out),
                   env={"HF_HOME": str(tmp_path), "HF_HUB_CACHE": ""})
  assert r.returncode == 2
  assert "is not in the Hugging Face cache" in r.stderr and f"hf download {repo}" in r.stderr
  assert "Traceback" not in r.stderr
  assert not out.exists()


def test_hf_cache_wrong_family_and_unknown_architecture(tmp_path):
  # A DeiT III config.json whose weights are DeiT's: the family error, nothing written.
  _hf_cache(tmp_path / "a", weights="deit_plain.safetensors")
  with pytest.raises(checkpoint.CheckpointError, match="target model is a DeiT III"):
    convert.convert_from_hf(HF_ID, str(tmp_path / "out"), cache_dir=str(tmp_path / "a"))
  assert not (tmp_path / "out").exists()
  with pytest.raises(checkpoint.CheckpointError, match="not deit_tiny_patch16_224"):
    convert.convert_from_hf(HF_ID, str(tmp_path / "out"), cache_dir=str(tmp_path / "a"),
                            model_name="deit_tiny_patch16_224")
  _hf_cache(tmp_path / "b", config={"architecture": "vit_giant_patch14_224"})
  with pytest.raises(checkpoint.CheckpointError, match="does not implement"):
    convert.convert_from_hf(HF_ID, str(tmp_path / "out"), cache_dir=str(tmp_path / "b"))
  assert not (tmp_path / "out").exists()
