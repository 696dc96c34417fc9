"""benchmarks/speed.py without timm: the pure parts, the fit check, one tiny row end to end."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("speed", os.path.join(ROOT, "benchmarks",
                                                                      "speed.py"))
speed = importlib.util.module_from_spec(_spec)
sys.modules["speed"] = speed  # dataclasses look their module up there
_spec.loader.exec_module(speed)

# The demo student shrunk for tests (tests/tiny_config.py: 2 blocks, 16 px) at batch 16
# (divisible by the 8 simulated devices), one timed step; the CPU peak is given, not measured.
TINY_CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")
TINY = ["--config", TINY_CONFIG, "--train-batch", "16", "--infer-batch", "16", "--iters", "1",
        "--warmup", "1", "--rounds", "1", "--matmul-peak", "100"]


def test_estimate_max_batch_and_message():
  mib = 2 ** 20
  # 1 MiB fixed + 1 MiB per example; 20 MiB free with 5% headroom -> 18 -> multiple of 8: 16.
  points = [(64, 65 * mib), (32, 33 * mib)]
  assert speed.estimate_max_batch(points, 20 * mib, 8) == 16
  assert speed.estimate_max_batch(points, 4 * mib, 8) is None
  assert speed.estimate_max_batch([(64, 64 * mib)], 40 * mib, 8) == 32  # one point: all per-example
  msg = speed.fit_message("deit_b", "train", 4096, 180 * 2 ** 30, 139 * 2 ** 30, "device free",
                          3072, "--train-batch")
  assert msg.startswith("deit_b train batch 4096 needs ~180.0 GiB, the device has 139.0 GiB free")
  assert "about 3072 (estimated) -- rerun with --train-batch 3072, or --find-max-batch" in msg
  assert "no batch fits" in speed.fit_message("x", "infer", 8, 10, 1, "f", None, "--infer-batch")


def test_cost_flops_peaks_and_oom_detection():
  assert speed.cost_flops({"flops": 3.0}) == 3.0
  assert speed.cost_flops([{"flops": 1.0}, {"flops": 2.0}]) == 3.0
  assert speed.cost_flops(None) is None and speed.cost_flops([{}]) is None
  assert speed.table_peak("NVIDIA H200", "bfloat16") == 989e12
  assert speed.table_peak("NVIDIA H100 PCIe", "float32") == 378e12
  assert speed.table_peak("TPU v5 lite", "bfloat16") == 197e12
  assert speed.table_peak("cpu", "float32") is None
  assert speed.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
  assert not speed.is_oom(ValueError("shapes do not match"))


def test_timm_spec_follows_the_configs():
  demo = speed.CATALOG["demo"]()
  s = speed.timm_spec(demo, "cpu")
  assert s["kind"] == "deit" and s["img_size"] == 32 and s["num_classes"] == 10
  assert s["model_kw"] == {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2,
                           "mlp_ratio": 4.0, "qkv_bias": True, "drop_path_rate": 0.05}
  assert s["mixup"]["prob"] == 0.3 and s["label_smoothing"] == 0.1 and s["ema_decay"] == 0.995
  assert s["teacher"] == {"model": "regnety_002", "num_classes": 10}
  assert s["distill_kind"] == "hard" and s["alpha"] == 0.5
  cnn = speed.timm_spec(speed.CATALOG["regnety_002"](), "cpu")
  assert cnn["kind"] == "cnn" and cnn["mixup"]["prob"] == 0.0 and not cnn["ema_decay"]
  assert "teacher" not in cnn and cnn["train_batch"] == 64
  zoo = speed.timm_spec(speed.CATALOG["deit_ti"](), "cpu")
  assert zoo["teacher"] == {"model": "regnety_160", "num_classes": 1000}
  assert zoo["model_kw"]["embed_dim"] == 192 and zoo["img_size"] == 224
  infer = speed.timm_spec(speed.CATALOG["resnet50_infer"](), "cpu")
  assert infer["kind"] == "infer" and infer["infer_batch"] == 16


def test_demo_row_end_to_end(tmp_path, capsys):
  out = tmp_path / "r.json"
  md = tmp_path / "r.md"
  rc = speed.main(TINY + ["--variants", "train,infer", "--json", str(out), "--markdown", str(md)])
  assert rc == 0
  results = json.loads(out.read_text())["results"]
  assert [r["variant"] for r in results] == ["train", "infer"]
  for r in results:
    assert not r.get("error"), r
    for k in ("ours_img_s", "compile_s", "gflop_per_img", "mfu", "xla_mem_bytes", "peak_bytes"):
      assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert r["batch"] == 16
  table = capsys.readouterr().out
  assert "train, student alone" in table and "inference" in table
  assert "| tiny_config | train, student alone | 16 |" in md.read_text()


@pytest.fixture(scope="module")
def infer_needs():
  """XLA's memory estimate of the tiny model's inference at batch 64 and 128 (all devices)."""
  import jax
  row = speed.select_rows(speed.parse_args(TINY + ["--variants", "infer"]))[0]
  ours = speed.Ours(row, speed.sharding.make_mesh(jax.device_count()))
  return tuple(ours.compile("infer", b).mem_total for b in (64, 128))


def test_program_that_does_not_fit_is_skipped_with_a_message(infer_needs, capsys):
  args = TINY + ["--variants", "infer", "--infer-batch", "128"]
  need64, need128 = infer_needs
  limit = (need64 + need128) / 2  # 64 fits, 128 does not
  expected = speed.estimate_max_batch([(64, need64), (128, need128)], limit, 8)
  assert expected and 64 <= expected < 128
  rc = speed.main(args + ["--mem-limit", str(limit / 2 ** 30)])
  assert rc == 2  # every requested row failed
  out = capsys.readouterr()
  text = out.out + out.err
  assert "tiny_config inference batch 128 needs ~" in text
  assert (f"the largest batch that fits is about {expected} (estimated) -- rerun with "
          f"--infer-batch {expected}, or --find-max-batch to search") in text
  assert "Traceback" not in text


def test_out_of_memory_at_run_time_is_one_message(monkeypatch, capsys):
  def boom(self, variants):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.3GiB.")
  monkeypatch.setattr(speed.Ours, "allocate", boom)
  rc = speed.main(TINY + ["--variants", "infer"])
  assert rc == 2
  out = capsys.readouterr()
  text = out.out + out.err
  assert "tiny_config inference batch 16 ran out of memory at run time" in text
  assert "--infer-batch 8" in text and "Traceback" not in text


def test_imports_without_tensorflow():
  code = ("import sys; sys.modules['tensorflow'] = None; import runpy; "
          f"runpy.run_path({os.path.join(ROOT, 'benchmarks', 'speed.py')!r}); print('ok')")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_find_max_batch_searches_by_compiling(infer_needs, tmp_path, capsys):
  args = TINY + ["--variants", "infer", "--infer-batch", "64"]
  limit = sum(infer_needs) / 2
  out = tmp_path / "max.json"
  rc = speed.main(args + ["--find-max-batch", "--mem-limit", str(limit / 2 ** 30),
                          "--json", str(out)])
  assert rc == 0
  found = json.loads(out.read_text())["max_batch"][0]
  assert 64 <= found["max_batch"] < 128 and found["max_batch"] % 8 == 0
  assert found["bytes"] <= limit
  assert f"use --infer-batch {found['max_batch']}" in capsys.readouterr().out
