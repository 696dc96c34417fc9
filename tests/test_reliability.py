"""Reliability of the trainer at tiny scale on CPU: best and last checkpoints never block each
other, one run per workdir, the stored config checked on resume, checksums of checkpoints and of
the teacher, SIGTERM, the non-finite-step message, train metrics without gaps or duplicates."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
from flax import nnx

from deit_jax import checkpoint, data, distill, sharding, step, teachers, train
from deit_jax import plan as plan_lib

sys.path.insert(0, os.path.dirname(__file__))
import tiny_config  # noqa: E402


def cfg(**overrides):
  c = tiny_config.get_config()
  c.log_every_steps = 4  # checkpoints every 2 steps fall between the log steps
  c.update_from_flattened_dict(overrides)
  return c


def _params(directory, **kw):
  return checkpoint.model_params(checkpoint.load_model(directory, **kw))


def _lines(workdir, name="metrics.jsonl"):
  return [json.loads(l) for l in open(os.path.join(workdir, name))]


def _steps(workdir, sub="checkpoints"):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, sub)) if s.isdigit())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 6-step run (checkpoints 2, 4, 6; train logs at 4 and 6; best at 6)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train.train_and_evaluate(cfg(), workdir)
  return workdir


def _copy(finished, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(finished, dst)
  return dst


# --- 9: every step in the logged means -----------------------------------------------------------
def test_logged_train_means_cover_every_step_and_the_lock_is_released(finished):
  c = cfg()
  source = data.build_source(c.data)
  plan = plan_lib.make_plan(c, 8, source.num_examples, 360, source.num_classes)
  sched = step.lr_schedule(c, plan)
  train_lines = {l["step"]: l for l in _lines(finished) if "train/loss" in l}
  assert sorted(train_lines) == [4, 6]
  # A checkpoint at step 2 fetched steps 1-2; they still count in the mean logged at step 4.
  np.testing.assert_allclose(train_lines[4]["train/lr"], np.mean([sched(i) for i in range(4)]),
                             rtol=1e-6)
  np.testing.assert_allclose(train_lines[6]["train/lr"], np.mean([sched(i) for i in (4, 5)]),
                             rtol=1e-6)
  assert not os.path.exists(os.path.join(finished, train.LOCK_FILE))
  for s in _steps(finished):  # 6: every committed step has its checksums
    assert checkpoint.checksum_problems(os.path.join(finished, "checkpoints", str(s))) == []


# --- 1, 6, 9: resume over a corrupt latest step and an existing best step ------------------------
def test_resume_skips_a_corrupt_step_overwrites_best_and_logs_no_step_twice(finished, tmp_path,
                                                                           capsys):
  """The crash loop of the issue: best/6 exists and a re-evaluated step 6 beats best.json; the
  regular step 6 is corrupt (garbled bytes) and step 4 is gone, so the run resumes from 2."""
  workdir = _copy(finished, tmp_path)
  want = _params(os.path.join(finished, "checkpoints"))
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  step6 = os.path.join(workdir, "checkpoints", "6")
  biggest = max((os.path.join(r, f) for r, _, fs in os.walk(step6) for f in fs),
                key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    f.write(b"\xde\xad\xbe\xef" * 4)
  best = json.load(open(os.path.join(workdir, "best.json")))
  json.dump({**best, "value": -1.0}, open(os.path.join(workdir, "best.json"), "w"))
  capsys.readouterr()
  result = train.train_and_evaluate(cfg(), workdir)
  out = capsys.readouterr().out
  assert "checkpoint step 6" in out and "corrupt" in out and "nothing deleted" in out
  assert f"Resumed from {workdir} at step 2." in out
  assert result["step"] == 6 and _steps(workdir) == [2, 4, 6]
  got = _params(os.path.join(workdir, "checkpoints"))
  for k in want:  # resumed from 2: still bit-exact
    np.testing.assert_array_equal(want[k], got[k], err_msg=k)
  # The best record matches what is on disk; the replaced steps were moved, not deleted.
  best = json.load(open(os.path.join(workdir, "best.json")))
  assert best["step"] == 6 and best["value"] == result["eval/top1"]
  assert _steps(workdir, "best") == [6]
  assert sorted(n.rsplit("_", 1)[0] for n in os.listdir(os.path.join(workdir, "superseded"))) == [
      "best_6", "checkpoints_6"]
  # metrics.jsonl: the records of the replayed steps 3-6 appear once.
  keys = [(l["step"], "train/loss" in l) for l in _lines(workdir)]
  assert sorted(keys) == [(4, True), (6, False), (6, True)]


# --- 2: one run per workdir -----------------------------------------------------------------------
@pytest.mark.parametrize("holder", ["this_process", "other_host"])
def test_a_live_lock_is_refused_naming_its_holder(tmp_path, holder):
  workdir = str(tmp_path / "locked")
  os.makedirs(workdir)
  host, pid = ((socket.gethostname(), os.getpid()) if holder == "this_process"
               else ("elsewhere.example", 1234))
  json.dump({"host": host, "pid": pid}, open(os.path.join(workdir, "run.lock"), "w"))
  with pytest.raises(plan_lib.ConfigError, match=f"host {host}, pid {pid}"):
    train.train_and_evaluate(cfg(), workdir)
  assert os.listdir(workdir) == ["run.lock"]  # nothing else written, the lock kept


def test_a_stale_lock_of_a_dead_process_is_recovered(tmp_path):
  p = subprocess.Popen(["true"])
  p.wait()  # reaped: the pid is dead
  path = os.path.join(str(tmp_path), "run.lock")
  json.dump({"host": socket.gethostname(), "pid": p.pid}, open(path, "w"))
  assert train.acquire_lock(str(tmp_path)) == path
  assert json.load(open(path))["pid"] == os.getpid()
  train.release_lock(path)
  assert not os.path.exists(path)


# --- 3: the stored config on resume -----------------------------------------------------------
def test_resume_with_another_config_is_refused_listing_the_differences(finished):
  before = open(os.path.join(finished, "config.json")).read()
  with pytest.raises(plan_lib.ConfigError) as e:
    train.train_and_evaluate(cfg(seed=1, batch_size=32, total_steps=8,
                                 **{"optimizer.lr": 1e-3}), finished)
  msg = str(e.value)
  for key in ("seed: stored 0, this run 1", "batch_size", "total_steps", "optimizer.lr",
              "allow_config_change"):
    assert key in msg
  assert "log_every_steps" not in msg
  assert open(os.path.join(finished, "config.json")).read() == before
  assert not os.path.exists(os.path.join(finished, "config_changes.jsonl"))


def test_allowed_or_explicit_config_changes_are_recorded(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  # Logging / eval / keep fields never break exactness: no opt-in needed (a finished run: 0 steps).
  train.train_and_evaluate(cfg(log_every_steps=3, keep_checkpoints=5), workdir)
  train.train_and_evaluate(cfg(log_every_steps=3, keep_checkpoints=5, seed=7,
                               allow_config_change=True), workdir)
  changes = _lines(workdir, "config_changes.jsonl")
  assert [c["step"] for c in changes] == [6, 6]
  assert changes[0]["changes"] == {"keep_checkpoints": [3, 5], "log_every_steps": [4, 3]}
  assert changes[1]["changes"] == {"allow_config_change": [False, True], "seed": [0, 7]}
  assert json.load(open(os.path.join(workdir, "config.json")))["seed"] == 7


# --- 6: the teacher's checksum on resume ----------------------------------------------------------
def _tiny_teacher(seed):
  c = teachers.RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=4, se_ratio=0.25,
                         stem_width=8)
  return teachers.RegNet(c, 10, rngs=nnx.Rngs(seed))


def test_a_changed_teacher_is_refused_on_resume(tmp_path):
  teacher, workdir = str(tmp_path / "teacher"), str(tmp_path / "run")
  checkpoint.save_model(_tiny_teacher(1), teacher)
  c = cfg(**{"distillation.kind": "soft", "teacher.checkpoint": teacher})
  mesh = sharding.make_mesh(1)
  distill.load(c, mesh, [(".*", "replicate")], 10, workdir)  # a new run records the teacher
  os.makedirs(os.path.join(workdir, "checkpoints", "2"))  # ... and trains
  distill.load(c, mesh, [(".*", "replicate")], 10, workdir)  # same weights: fine
  shutil.rmtree(teacher)
  checkpoint.save_model(_tiny_teacher(2), teacher)  # same path, other weights
  recorded = open(os.path.join(workdir, "teacher.json")).read()
  with pytest.raises(distill.TeacherError, match="teacher checkpoint changed"):
    distill.load(c, mesh, [(".*", "replicate")], 10, workdir)
  assert open(os.path.join(workdir, "teacher.json")).read() == recorded  # not overwritten


# --- 7: SIGTERM ----------------------------------------------------------------------------------
def test_sigterm_during_start_up_is_honoured_before_the_first_step(tmp_path, monkeypatch):
  build = data.build_source

  def build_and_get_preempted(*a, **kw):
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
      pytest.fail("no SIGTERM handler while the data is being built")
    signal.raise_signal(signal.SIGTERM)
    return build(*a, **kw)

  monkeypatch.setattr(train.data, "build_source", build_and_get_preempted)
  workdir = str(tmp_path / "early")
  result = train.train_and_evaluate(cfg(log_every_steps=100, checkpoint_every_steps=100),
                                    workdir)
  assert result["preempted"] and result["step"] == 0
  assert _steps(workdir) == [0]
  assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)  # handler restored


def test_hosts_agree_on_a_sigterm_at_every_step(monkeypatch):
  """Process 1 got the signal: process 0 stops at the same (any) step, and knows it was SIGTERM."""
  monkeypatch.setattr(train.jax, "process_count", lambda: 2)
  monkeypatch.setattr(train.multihost_utils, "process_allgather",
                      lambda x: np.array([np.int32(x), np.int32(1)]))
  every = train.STOP_SYNC_EVERY
  assert all(train.stop_requested(False, s) for s in (every, 3 * every, 7 * every))
  assert not train.stop_requested(False, every + 1)  # between agreements: keep going


# --- 8: what the non-finite-step message says ------------------------------------------------
def _metrics(loss=True, grads=True, update=True):
  return {"finite": loss and update, "finite_loss": loss, "finite_grads": grads,
          "finite_update": update, "loss": 2.22 if loss else float("nan"),
          "grad_norm": 1.0 if grads else float("inf"), "lr": 0.0}


def test_non_finite_message_names_what_the_checkpoint_and_the_fixes(tmp_path):
  c = cfg()
  plan = plan_lib.make_plan(c, 8, 1000, 360, 10)
  ckpts = types.SimpleNamespace(last_saved=None, workdir=str(tmp_path))
  pending = train.PendingMetrics(ckpts, train.nan_hints(c, plan))
  pending.add(0, _metrics(update=False))
  with pytest.raises(FloatingPointError) as e:
    pending.check()
  msg = str(e.value)
  assert "Non-finite update at step 0" in msg and "Loss is" not in msg
  assert "No checkpoint of this run exists yet" in msg and "step 0)" not in msg
  assert "clip_grad" in msg and "float32" not in msg  # a float32 run
  ckpts.last_saved = 4
  assert "Non-finite gradient at step 5" in pending.message(5, _metrics(grads=False,
                                                                        update=False))
  assert "Non-finite loss" in pending.message(5, _metrics(loss=False))
  assert "last checkpoint, step 4" in pending.message(5, _metrics(loss=False))
  bf16 = cfg(**{"model_kw.dtype": "bfloat16", "optimizer.clip_grad": 1.0})
  hints = train.nan_hints(bf16, plan)
  assert "model_kw.dtype=float32" in hints and "smaller optimizer.clip_grad (now 1.0)" in hints
  assert "finite learning rate" in train.nan_hints(cfg(**{"optimizer.lr": float("nan")}), plan)
