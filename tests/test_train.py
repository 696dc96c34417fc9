"""The trainer on CPU at tiny scale: sharding invariance, gradient accumulation, exact resume,
two processes, NaN handling, recipe details and bad configs."""
import json
import math
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from deit_jax import checkpoint, data, sharding, step, train
from deit_jax import plan as plan_lib

sys.path.insert(0, os.path.dirname(__file__))
import tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(**overrides):
  c = tiny_config.get_config()
  c.update_from_flattened_dict(overrides)
  return c


def _one_step(config, num_devices):
  mesh = sharding.make_mesh(num_devices)
  source = data.build_source(config.data)
  plan = plan_lib.make_plan(config, num_devices, source.num_examples, 360, source.num_classes)
  model = step.build_model_state(config, plan, mesh)
  batch = next(data.train_iterator(source, config.aug, global_batch_size=config.batch_size,
                                   seed=config.seed))
  batch = data.to_global({k: batch[k] for k in ("image", "label")},
                         sharding.batch_sharding(mesh))
  train_step = step.jit_train_step(config, plan, model, mesh)
  state, metrics = train_step(model.init(), batch, None)
  return jax.device_get(state["params"]), jax.device_get(metrics)


def _assert_trees_close(a, b, atol):
  fa, fb = checkpoint.flatten(a), checkpoint.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], atol=atol, rtol=0, err_msg=k)


def test_step_on_8_devices_equals_1_device_and_fsdp():
  # Per-device mixup pairing depends on the device count by design; pair over the whole batch.
  c = cfg(**{"mixup.per_device": False})
  p1, m1 = _one_step(c, 1)
  p8, m8 = _one_step(c, 8)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  _assert_trees_close(p1, p8, atol=1e-6)
  c.sharding.rules = [(".*", "fsdp")]
  pf, mf = _one_step(c, 8)
  np.testing.assert_allclose(mf["loss"], m8["loss"], rtol=1e-5)
  _assert_trees_close(pf, p8, atol=1e-6)


def test_gradient_accumulation_equals_the_big_batch():
  c = cfg(**{"model_kw.drop_path_rate": 0.0})
  big, mb = _one_step(c, 8)
  c.grad_accum_steps = 2
  acc, ma = _one_step(c, 8)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-4)
  _assert_trees_close(acc, big, atol=1e-7)


def test_lr_schedule_follows_timm():
  c = cfg(**{"optimizer.warmup_epochs": 1.0})
  plan = plan_lib.make_plan(c, 1, 16 * 10, 16, 10)  # 10 steps per epoch, 6 steps in all
  c.total_steps = 100
  plan = plan_lib.make_plan(c, 1, 16 * 10, 16, 10)
  sched = step.lr_schedule(c, plan)
  peak, lo, start = plan.peak_lr, c.optimizer.min_lr, c.optimizer.warmup_lr
  assert plan.warmup_steps == 10 and math.isclose(peak, 5e-4 * 16 / 512)
  np.testing.assert_allclose(sched(0), start, rtol=1e-6)
  np.testing.assert_allclose(sched(5), start + 0.5 * (peak - start), rtol=1e-5)
  for t in (10, 50, 99):  # timm: the cosine runs over the whole run, warmup included
    want = lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * t / 100))
    np.testing.assert_allclose(sched(t), want, rtol=1e-5)


def test_weight_decay_mask():
  params = {"pos_embed": np.zeros((1, 3, 4)), "cls_token": np.zeros((1, 1, 4)),
            "dist_token": np.zeros((1, 1, 4)),
            "blocks": {"0": {"norm1": {"scale": np.zeros(4), "bias": np.zeros(4)},
                             "attn": {"qkv": {"kernel": np.zeros((4, 12)), "bias": np.zeros(12)}}}}}
  m = checkpoint.flatten(step.decay_mask(params, decay_dist_token=True))
  assert m == {"pos_embed": False, "cls_token": False, "dist_token": True,
               "blocks/0/norm1/scale": False, "blocks/0/norm1/bias": False,
               "blocks/0/attn/qkv/kernel": True, "blocks/0/attn/qkv/bias": False}
  assert not checkpoint.flatten(step.decay_mask(params, decay_dist_token=False))["dist_token"]


def _final_params(workdir, ema=False):
  model = checkpoint.load_model(os.path.join(workdir, "checkpoints"), ema=ema)
  return checkpoint.model_params(model)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  result = train.train_and_evaluate(cfg(), workdir)
  return workdir, result


def test_run_writes_logs_checkpoints_and_evaluates_every_head(full_run):
  workdir, result = full_run
  assert result["step"] == 6 and not result["preempted"]
  for head in ("cls", "dist", "both", "ema"):
    assert 0 <= result[f"eval/{head}_top1"] <= result[f"eval/{head}_top5"] <= 100
  assert result["eval/count"] == 360  # every test example exactly once
  assert result["eval/top1"] == result["eval/both_top1"]
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [l["step"] for l in lines if "train/loss" in l] == [2, 4, 6]
  assert all(np.isfinite(l["train/loss"]) for l in lines if "train/loss" in l)
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert json.load(open(os.path.join(workdir, "config.json")))["model"] == (
      "deit_tiny_distilled_patch16_224")
  best = json.load(open(os.path.join(workdir, "best.json")))
  assert best["metric"] == "eval/top1" and best["step"] == 6
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                 if s.isdigit())
  assert steps == [2, 4, 6]  # keep_checkpoints=3
  assert checkpoint.load_model(os.path.join(workdir, "best")).config.depth == 2
  # EMA weights differ from the raw weights and are stored beside them.
  raw, ema = _final_params(workdir), _final_params(workdir, ema=True)
  assert any(not np.allclose(raw[k], ema[k]) for k in raw)


def test_interrupted_and_resumed_run_is_exact(full_run, tmp_path):
  workdir, _ = full_run
  split = str(tmp_path / "split")
  first = train.train_and_evaluate(cfg(), split, max_steps=3)
  assert first["step"] == 3
  second = train.train_and_evaluate(cfg(), split)
  assert second["step"] == 6
  a, b = _final_params(workdir), _final_params(split)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  ea, eb = _final_params(workdir, ema=True), _final_params(split, ema=True)
  for k in ea:
    np.testing.assert_array_equal(ea[k], eb[k], err_msg=k)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  train.train_and_evaluate(cfg(), workdir, max_steps=2)
  before = _final_params(workdir)
  with pytest.raises(FloatingPointError, match="step 2"):
    train.train_and_evaluate(cfg(**{"optimizer.lr": float("nan"),
                                   "allow_config_change": True}), workdir)
  after = _final_params(workdir)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit()) == [2]
  for k in before:
    np.testing.assert_array_equal(before[k], after[k])


def test_workdir_of_another_model_is_refused(full_run):
  workdir, _ = full_run
  listing = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(plan_lib.ConfigError, match="different model"):
    train.train_and_evaluate(cfg(**{"model_kw.depth": 3}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == listing


@pytest.mark.parametrize("overrides,match", [
    ({"batch_size": 20}, "divisible by the device count"),
    ({"grad_accum_steps": 3}, "divisible by the device count x grad_accum_steps"),
    ({"distillation.kind": "hard"}, "needs a teacher"),
    ({"distillation.kind": "soft", "teacher.checkpoint": "/nonexistent"}, "not a directory"),
    ({"model": "deit_tiny_patch16_224", "optimizer.decay_dist_token": False},
     "distillation-token option"),
    ({"model": "deit_tiny_patch16_224", "eval_head": "dist"}, "needs a distillation token"),
    ({"distillation.kind": "kl"}, "kind"),
    ({"model": "deit_giant"}, "not a DeiT model"),
    ({"sharding.rules": [(".*", "zero3")]}, "unknown rule"),
    ({"distillation.kind": "soft", "teacher.checkpoint": ROOT, "teacher.conv_impl": "fast"},
     "teacher.conv_impl='fast'"),
])
def test_bad_configs_fail_before_compiling(overrides, match, tmp_path):
  c = cfg()
  for k, v in overrides.items():
    if k == "sharding.rules":
      c.sharding.rules = v
    else:
      c.update_from_flattened_dict({k: v})
  with pytest.raises(plan_lib.ConfigError, match=match):
    plan_lib.validate_config(c, 8)


def _launch(args, devices, env_extra=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env_extra or {})}
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"),
                           "--config", os.path.join(ROOT, "tests", "tiny_config.py"), *args],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def test_unknown_config_key_is_a_clear_error(tmp_path):
  p = _launch(["--workdir", str(tmp_path), "--config.optimzer.lr=1"], 1)
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0 and "optimzer" in out
  assert not os.listdir(tmp_path)


def test_two_processes_train_like_one(tmp_path):
  """Two local processes (jax.distributed, 2 CPU devices each) = one process with 4 devices."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  common = ["--config.total_steps=4"]
  procs = [_launch(["--workdir", multi, f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}", *common], 2) for i in range(2)]
  procs.append(_launch(["--workdir", single, *common], 4))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "step 4/4" in outs[0] and "step 4/4" not in outs[1]  # only process 0 logs
  a, b = _final_params(multi), _final_params(single)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


def test_eval_mode_reproduces_the_run_and_reads_converted_weights(full_run, tmp_path):
  from deit_jax import run
  workdir, result = full_run
  again = run.run_eval(cfg(), workdir)
  for head in ("cls", "dist", "both", "ema"):
    assert again[f"eval/{head}_top1"] == pytest.approx(result[f"eval/{head}_top1"])
  assert json.load(open(os.path.join(workdir, "eval.json")))["eval/count"] == 360
  # A converted-style checkpoint (no EMA): every head but the EMA.
  ckpt = str(tmp_path / "converted")
  checkpoint.save_model(checkpoint.load_model(os.path.join(workdir, "checkpoints")), ckpt)
  res = run.run_eval(cfg(), str(tmp_path / "w"), ckpt)
  assert res["eval/both_top1"] == pytest.approx(result["eval/both_top1"])
  assert "eval/ema_top1" not in res


def test_benchmark_mode():
  from deit_jax import run
  res = run.run_benchmark(cfg(), warmup=1, iters=1)
  assert res["train_img_per_s"] > 0 and res["inference_img_per_s"] > 0 and res["devices"] == 8


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  import signal
  workdir = str(tmp_path / "preempted")
  p = _launch(["--workdir", workdir, "--config.total_steps=100000", "--config.log_every_steps=1",
               "--config.checkpoint_every_steps=100000"], 1)
  seen = []
  for line in p.stdout:  # wait until training runs
    seen.append(line)
    if line.startswith("step 3/"):
      break
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=300)
  out = "".join(seen) + out
  assert p.returncode == train.PREEMPTED_EXIT_STATUS, out[-3000:]  # requeue me
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3
  assert f"SIGTERM: saving step {saved[0]} and exiting." in out
