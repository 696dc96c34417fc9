"""Experiments (configs/demo.py, configs/table3.py): a teacher and students, each its own run,
then one results table."""
import json
import os
import sys

import ml_collections
import pytest

from deit_jax import checkpoint, experiment, run
from deit_jax.plan import ConfigError

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "configs"))
import demo  # noqa: E402
import table3  # noqa: E402
import tiny_config  # noqa: E402
from test_distill import tiny_teacher  # noqa: E402


def _row(name, seed, kind, both, cls=None, dist=None, agree=None):
  heads = {"cls": {"top1": both}}
  if cls is not None:
    heads = {"cls": {"top1": cls}, "dist": {"top1": dist}, "both": {"top1": both}}
  if agree is not None:
    for h in heads.values():
      h["agree"] = agree
  return {"name": name, "seed": seed, "kind": kind, "heads": heads, "teacher_top1": 90.0,
          "workdir": name}


def test_summary_pairs_each_seed_with_the_baseline():
  config = ml_collections.ConfigDict({"experiment": "t", "teacher_checkpoint": "/t"})
  rows = [_row("none", 0, "none", 60.0, agree=70.0), _row("hard", 0, "hard", 64.0, 62.0, 66.0),
          _row("none", 1, "none", 50.0, agree=60.0), _row("hard", 1, "hard", 58.0, 56.0, 60.0)]
  report = experiment.summarize(config, rows)
  assert report["baseline"] == "none" and report["teacher"]["top1"] == 90.0
  both = report["students"]["hard"]["heads"]["both"]
  assert both["top1"]["mean"] == 61.0 and both["vs_baseline"]["values"] == [4.0, 8.0]
  assert both["vs_baseline"]["std"] == pytest.approx(2 ** 0.5 * 2)
  assert "vs_baseline" not in report["students"]["none"]["heads"]["cls"]
  assert list(report["students"]) == ["none", "hard"]  # the baseline first
  table = experiment.results_markdown(report)
  assert "| hard | class head | 59.00 ± 4.24 | +4.00 ± 2.83 |" in table
  assert "| none | class head (the only one) | 55.00 ± 7.07 |  | 65.00 ± 7.07 |" in table
  assert "2 seeds (0, 1)" in table and "| teacher | | 90.00 |" in table


def test_configs_describe_the_runs(tmp_path):
  runs = experiment.stages(demo.get_config(), str(tmp_path))
  assert [(r["name"], r["config"].distillation.kind, r["config"].model) for r in runs] == [
      ("teacher", "none", "regnety_002"),
      ("hard", "hard", "deit_tiny_distilled_patch16_224"),
      ("no_distillation", "none", "deit_tiny_patch16_224")]
  assert all(r["config"].teacher.checkpoint == str(tmp_path / "teacher" / "checkpoints")
             for r in runs[1:])
  experiment._validate(runs)  # the students' teacher is trained first: it need not exist yet
  t3 = table3.get_config()
  t3.seeds = (0, 4)
  runs = experiment.stages(t3, str(tmp_path))
  assert len(runs) == 1 + 2 * 5 and runs[-1]["workdir"].endswith("soft_paper_seed4")
  soft = t3.students.soft_paper.distillation
  assert (soft.kind, soft.tau, soft.alpha) == ("soft", 3.0, 0.1)
  assert t3.students.hard_class.model == "deit_tiny_patch16_224"


def test_bad_experiments_are_refused_before_training(tmp_path):
  os.makedirs(tmp_path / "t")
  c = _tiny_experiment(str(tmp_path / "t"))
  c.students.hard.batch_size = 7  # does not divide over the 8 devices
  with pytest.raises(ConfigError, match="config.students.hard: .*batch_size"):
    experiment.run_experiment(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "hard")
  c.teacher_checkpoint = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="teacher_checkpoint"):
    experiment.run_experiment(c, str(tmp_path / "w"))
  with pytest.raises(ConfigError, match="one run's config"):
    run.run("eval", demo.get_config(), str(tmp_path / "w"))


def _tiny_experiment(teacher_dir):
  c = ml_collections.ConfigDict({"experiment": "tiny", "seeds": (0,),
                                 "teacher": tiny_config.get_config(),
                                 "teacher_checkpoint": teacher_dir})
  plain, hard = tiny_config.get_config(), tiny_config.get_config()
  plain.model = "deit_tiny_patch16_224"
  hard.distillation.kind = "hard"
  for s in (plain, hard):
    s.teacher.conv_impl = "xla"  # compiles faster than the CPU default (test_conv checks both)
    s.total_steps = 2
    s.checkpoint_every_steps = 2
  c.students = ml_collections.ConfigDict({"no_distillation": plain, "hard": hard})
  return c


def test_a_tiny_experiment_end_to_end(tmp_path):
  teacher_dir = str(tmp_path / "teacher_ckpt")
  checkpoint.save_model(tiny_teacher(), teacher_dir)
  workdir = str(tmp_path / "exp")
  report = experiment.run_experiment(_tiny_experiment(teacher_dir), workdir)
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert saved["students"].keys() == {"no_distillation", "hard"}
  assert saved["students"]["hard"]["heads"].keys() == {"cls", "dist", "both"}
  assert saved["students"]["no_distillation"]["heads"].keys() == {"cls"}
  for name in ("no_distillation", "hard"):
    records = [json.loads(line) for line in open(os.path.join(workdir, name, "metrics.jsonl"))]
    evaluated = [r for r in records if "eval/top1" in r][-1]
    assert os.path.isdir(os.path.join(workdir, name, "checkpoints", "2"))
    heads = saved["students"][name]["heads"]
    main = heads.get("both") or heads["cls"]
    assert main["top1"]["values"] == [evaluated["eval/top1"]]
    assert 0 <= main["agree"]["mean"] <= 100
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| hard | class head |" in table and "|  | distillation head |" in table
  assert "agrees with teacher" in table
  # Started again: every run is complete, nothing retrains, the same table.
  mtime = os.path.getmtime(os.path.join(workdir, "hard", "metrics.jsonl"))
  again = experiment.run_experiment(_tiny_experiment(teacher_dir), workdir)
  assert again["students"] == report["students"]
  assert os.path.getmtime(os.path.join(workdir, "hard", "metrics.jsonl")) == mtime
