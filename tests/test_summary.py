"""The summary a training run ends on (deit_jax/summary.py): from a tiny real run, started again
once finished, and from hand-written workdirs."""
import contextlib
import io
import json
import os
import re
import sys

import pytest

from deit_jax import progress, summary, train

sys.path.insert(0, os.path.dirname(__file__))
import tiny_config  # noqa: E402

SPEC = "tests/tiny_config.py"


def cfg():
  """The tiny config cut to what starts and compiles fastest: one block, one step."""
  c = tiny_config.get_config()
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 1, 1, 1
  c.model_kw.depth, c.aug.auto_augment, c.eval_batch_size = 1, None, 360
  return c


def _row(text, name, *numbers):
  """Whether `text` has the eval table row of head `name` with these numbers."""
  return re.search(rf"^    {name}" + "".join(rf"\s+{n:.2f}" for n in numbers) + "$", text, re.M)


def _lines(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 1-step run: (workdir, result, what it printed)."""
  workdir = str(tmp_path_factory.mktemp("summary") / "run")
  with contextlib.redirect_stdout(io.StringIO()) as out:
    result = train.train_and_evaluate(cfg(), workdir, config_spec=SPEC)
  return workdir, result, out.getvalue()


def test_a_finished_run_prints_its_summary_and_writes_summary_md(finished):
  workdir, result, out = finished
  text = result["summary"]
  assert out.endswith(f"\n{text}\n")  # printed at the end
  assert open(os.path.join(workdir, "summary.md")).read() == text + "\n"
  assert text.startswith(f"Summary of {workdir} (step 1):")
  final = [r for r in _lines(workdir) if "eval/top1" in r][-1]
  assert final["step"] == 1 and "Final eval (step 1):" in text
  for head, name in (("cls", "class"), ("dist", "distillation"), ("both", "both"), ("ema", "EMA")):
    assert _row(text, name, final[f"eval/{head}_top1"], final[f"eval/{head}_top5"])
  best = json.load(open(os.path.join(workdir, "best.json")))
  assert (f"Best: eval/top1 {best['value']:.2f} at step 1, in {workdir}/best/1." in text)
  assert f"Checkpoints: {workdir}/checkpoints/1 (last" in text
  assert summary.wall_time(_lines(workdir)) > 0 and "Training wall time: 0:0" in text
  run = f"python launch.py --config {SPEC} --workdir {workdir}"
  assert text.endswith(f"overrides, if any):\n    {run} --mode=eval\n    {run} --mode=visualize\n"
                       f"    tensorboard --logdir {workdir}/tensorboard")


def test_a_finished_run_started_again_only_says_so(finished, capsys):
  workdir, result, _ = finished
  events = sorted(os.listdir(os.path.join(workdir, "tensorboard")))
  records = _lines(workdir)
  again = train.train_and_evaluate(cfg(), workdir, config_spec=SPEC)
  out = capsys.readouterr().out
  assert again["summary"] == result["summary"]
  assert out == f"{workdir} is complete (step 1/1); nothing to train.\n{result['summary']}\n"
  assert again["step"] == 1 and not again["preempted"]
  assert again["eval/top1"] == result["eval/top1"]
  assert sorted(os.listdir(os.path.join(workdir, "tensorboard"))) == events
  assert _lines(workdir) == records


# --- From hand-written workdirs (no training) --------------------------------------------------
def _workdir(tmp_path, records, best=None):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  if best:
    json.dump(best, open(tmp_path / "best.json", "w"))
  return str(tmp_path)


def _eval(top1, **extra):
  return {"eval/cls_top1": top1, "eval/cls_top5": 90.0, "eval/ema_top1": 11.25,
          "eval/ema_top5": 88.5, "eval/top1": top1, "eval/top5": 90.0, "eval/count": 360.0,
          **extra}


def test_the_last_eval_record_and_the_best_are_reported(tmp_path):
  workdir = _workdir(tmp_path, [
      {"step": 4, **_eval(50.0)}, {"step": 5, "train/loss": 1.0, summary.WALL_KEY: 65.4},
      {"step": 6, **_eval(42.5, **{"eval/cls_agree": 77.5, "eval/teacher_top1": 88.33,
                                   "eval/teacher_top5": 99.0, "eval/token_cos": 0.5,
                                   "eval/new_metric": 3.25})},
      {"step": 6, "train/loss": 0.5}],
      best={"metric": "eval/top1", "value": 50.0, "step": 4})
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "eval/cls')  # a torn last line is skipped
  text = summary.build(workdir)
  assert "Final eval (step 6):" in text
  assert _row(text, "class", 42.5, 90.0, 77.5) and _row(text, "EMA", 11.25, 88.5)
  assert _row(text, "teacher", 88.33, 99.0)
  assert "360 images; reported as eval/top1: 42.50" in text
  assert "token cosine similarity after the last block: 0.5000" in text
  assert "    also: new_metric 3.25" in text
  assert f"Best: eval/top1 50.00 at step 4, in {workdir}/best/4." in text
  assert "Training wall time: 0:01:05." in text
  assert "Checkpoints:" not in text and "--mode=visualize" not in text  # none on disk
  assert f"python launch.py --config <config> --workdir {workdir} --mode=eval" in text


def test_a_workdir_without_evals_or_best_still_gets_the_commands(tmp_path):
  text = summary.build(_workdir(tmp_path, []), "configs/demo_distill.py:hard")
  assert "Final eval: none recorded" in text and "Best:" not in text
  assert "wall time" not in text
  assert f"--config configs/demo_distill.py:hard --workdir {tmp_path} --mode=eval" in text


def test_a_stopped_run_says_how_to_resume():
  text = summary.stopped("workdirs/demo", 1, 2, "max_steps", "configs/demo.py")
  assert text == ("Stopped at step 1/2 (max_steps); its checkpoint is in "
                  "workdirs/demo/checkpoints/1.\nResume it exactly by running the same command "
                  "again (with its --config.* overrides, if any):\n"
                  "    python launch.py --config configs/demo.py --workdir workdirs/demo")


def test_a_run_stopped_early_prints_how_to_resume_and_no_summary(tmp_path, capsys):
  result = train._report({"step": 3, "total_steps": 6, "preempted": True}, str(tmp_path), SPEC)
  assert result["summary"] == summary.stopped(str(tmp_path), 3, 6, "SIGTERM", SPEC)
  assert capsys.readouterr().out == result["summary"] + "\n"
  assert not os.path.exists(tmp_path / "summary.md")


def test_the_metric_writer_creates_no_file_before_its_first_write(tmp_path):
  writer = progress.MetricWriter(str(tmp_path), True)
  writer.close()
  assert os.listdir(tmp_path) == []
