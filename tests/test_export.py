"""Export for serving: each artifact, run through its own runtime (jax.export.deserialize,
tf.saved_model.load, onnxruntime), equals the JAX model within 1e-5 on the fixture inputs; bad
input leaves nothing behind."""
import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from deit_jax import checkpoint, convert, export

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
SMALL = dict(embed_dim=48, num_heads=3, depth=2, num_classes=10, img_size=32)
# (zoo name, fixture, distilled)
MODELS = {"deit_distilled": ("deit_tiny_distilled_patch16_224", "deit_distilled", True),
          "deit3_plain": ("deit3_small_patch16_224", "deit3_plain", False)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  out = {}
  for key, (name, fixture, distilled) in MODELS.items():
    extra = {"distilled": True} if name.startswith("deit3") and distilled else {}
    out[key] = convert.convert(name, os.path.join(FIX, f"{fixture}.safetensors"),
                               str(root / key), **SMALL, **extra)
  return out


def _run(fmt, path, images, names):
  """The artifact's outputs through its own runtime, nothing of deit_jax involved."""
  if fmt == "stablehlo":
    import jax
    with open(os.path.join(path, export.STABLEHLO_FILE), "rb") as f:
      out = jax.export.deserialize(bytearray(f.read())).call(images)
    return [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]
  if fmt == "savedmodel":
    import tensorflow as tf
    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    assert sorted(out) == sorted(names)
    return [out[n].numpy() for n in names]
  ort = pytest.importorskip("onnxruntime")
  session = ort.InferenceSession(os.path.join(path, export.ONNX_FILE),
                                 providers=["CPUExecutionProvider"])
  assert [o.name for o in session.get_outputs()] == names
  assert session.get_inputs()[0].name == "images"
  return session.run(names, {"images": images})


CASES = [("deit_distilled", False), ("deit_distilled", True), ("deit3_plain", False)]


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("key,both_heads", CASES)
def test_export_parity_through_the_artifacts_runtime(tmp_path, ckpts, fmt, key, both_heads):
  if fmt == "onnx":
    pytest.importorskip("jax2onnx")
  out = str(tmp_path / f"{fmt}_{key}_{both_heads}")
  export.export(ckpts[key], out, fmt, both_heads=both_heads)
  meta = json.load(open(os.path.join(out, export.METADATA_FILE)))
  names = ["cls_logits", "dist_logits"] if both_heads else ["logits"]
  assert [o["name"] for o in meta["outputs"]] == names
  assert meta["input"]["shape"] == [None, 32, 32, 3] and meta["input"]["layout"] == "NHWC"
  assert meta["input"]["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
  assert meta["parity"]["max_abs_diff_vs_jax"] <= 1e-5

  io = np.load(os.path.join(FIX, f"{MODELS[key][1]}_io.npz"))  # batch 3: not the traced 2
  model = checkpoint.load_model(ckpts[key])
  _, aux = model(io["images"], return_aux=True)
  if both_heads:
    expected = [aux["cls_logits"], aux["dist_logits"]]
  else:
    expected = [model(io["images"])]
  got = _run(fmt, out, io["images"], names)
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    assert g.shape == (3, 10)
    np.testing.assert_allclose(g, np.asarray(e), atol=1e-5, rtol=0)
  if not both_heads:  # and so within the conversion's bar of PyTorch itself
    np.testing.assert_allclose(got[0], io["logits"], atol=1e-4, rtol=0)
  # The distilled model's default output is the average of its two heads.
  if key == "deit_distilled" and not both_heads:
    np.testing.assert_allclose(got[0], (aux["cls_logits"] + aux["dist_logits"]) / 2, atol=1e-5)


def test_export_cli(tmp_path, ckpts):
  out = tmp_path / "cli"
  r = subprocess.run([sys.executable, "-m", "deit_jax.export", "--checkpoint",
                      ckpts["deit3_plain"], "--format", "stablehlo", "--output", str(out),
                      "--platforms", "cpu"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert "max abs diff" in r.stdout
  meta = json.load(open(out / export.METADATA_FILE))
  assert meta["platforms"] == ["cpu"] and meta["model"]["config"]["no_embed_class"]


def _leftovers(parent):
  return [p for p in os.listdir(parent) if ".tmp-" in p]


def test_export_of_an_unrebuildable_checkpoint_names_the_problem(tmp_path, ckpts):
  model = checkpoint.load_model(ckpts["deit3_plain"])
  desc = checkpoint.model_description(model)
  desc["config"]["rotary_embedding"] = True  # a field this version does not know
  bad = str(tmp_path / "bad")
  with ocp.CheckpointManager(bad, item_names=(checkpoint.MODEL_ITEM,
                                              checkpoint.PARAMS_ITEM)) as mngr:
    mngr.save(0, args=ocp.args.Composite(**{
        checkpoint.MODEL_ITEM: ocp.args.JsonSave(desc),
        checkpoint.PARAMS_ITEM: ocp.args.StandardSave(
            checkpoint.unflatten(checkpoint.model_params(model)))}))
  out = tmp_path / "exports" / "bad"
  r = subprocess.run([sys.executable, "-m", "deit_jax.export", "--checkpoint", bad,
                      "--format", "savedmodel", "--output", str(out)], capture_output=True,
                     text=True)
  assert r.returncode == 2
  assert "Cannot rebuild the model" in r.stderr and "rotary_embedding" in r.stderr
  assert "Traceback" not in r.stderr
  assert not out.exists()
  assert not (tmp_path / "exports").exists() or not _leftovers(tmp_path / "exports")


def test_export_refuses_existing_output_and_single_head_both_heads(tmp_path, ckpts):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(export.ExportError, match="already exists"):
    export.export(ckpts["deit3_plain"], str(out), "stablehlo")
  assert os.listdir(out) == ["keep.txt"]
  with pytest.raises(export.ExportError, match="--both_heads needs a distilled model"):
    export.export(ckpts["deit3_plain"], str(tmp_path / "x"), "stablehlo", both_heads=True)
  with pytest.raises(export.ExportError, match="--format"):
    export.export(ckpts["deit3_plain"], str(tmp_path / "x"), "tflite")
  assert not (tmp_path / "x").exists() and not _leftovers(tmp_path)


def test_a_failed_export_leaves_nothing(tmp_path, ckpts, monkeypatch):
  def broken(*args, **kwargs):
    open(os.path.join(args[2], "partial.bin"), "wb").write(b"half")
    raise RuntimeError("converter crashed")
  monkeypatch.setattr(export, "_stablehlo", broken)
  with pytest.raises(RuntimeError, match="converter crashed"):
    export.export(ckpts["deit3_plain"], str(tmp_path / "out"), "stablehlo")
  assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_stablehlo_refuses_weights_past_the_flatbuffer_limit(tmp_path, ckpts, monkeypatch):
  monkeypatch.setattr(export, "_FLATBUFFER_LIMIT", 1000)  # deit3_huge's 2.4 GiB, scaled down
  with pytest.raises(export.ExportError, match="2 GiB.*--format=savedmodel"):
    export.export(ckpts["deit3_plain"], str(tmp_path / "out"), "stablehlo")
  assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_a_cnn_teacher_exports_at_the_size_given(tmp_path):
  from flax import nnx
  from deit_jax import teachers
  cnn = teachers.RegNet(teachers.RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=4,
                                           se_ratio=0.25, stem_width=8), 10, rngs=nnx.Rngs(1))
  cnn.eval()
  ckpt = str(tmp_path / "cnn")
  checkpoint.save_model(cnn, ckpt)
  with pytest.raises(export.ExportError, match="--img_size"):
    export.export(ckpt, str(tmp_path / "x"), "stablehlo")
  out = str(tmp_path / "hlo")
  meta = export.export(ckpt, out, "stablehlo", img_size=32, platforms=["cpu"])
  assert meta["model"]["family"] == "teacher" and meta["input"]["shape"] == [None, 32, 32, 3]
  x = np.random.RandomState(1).randn(3, 32, 32, 3).astype(np.float32)
  np.testing.assert_allclose(_run("stablehlo", out, x, ["logits"])[0],
                             np.asarray(checkpoint.load_model(ckpt)(x)), atol=1e-5, rtol=0)
