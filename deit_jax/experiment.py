"""Comparisons of runs: a teacher, then students trained with and without it, and their table.

An experiment config (`configs/demo.py`, `configs/table3.py`) holds `experiment` (its name),
`seeds`, `teacher` (a training config) and `students` (name -> training config). `launch.py`
trains the teacher in `<workdir>/teacher`, every student for every seed in
`<workdir>/<student>` (seed 0) or `<workdir>/<student>_seed<k>`, with its teacher checkpoint set
to that teacher, then evaluates each student against the teacher (every head's top-1 and its
agreement with the teacher's argmax) and writes `<workdir>/results.md` and `results.json`.
Each run is an ordinary training run: a finished one is reused, an interrupted one resumes, so
starting the command again after a stop (or with more seeds) only trains what is missing.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import jax
import ml_collections

from deit_jax import evaluation
from deit_jax.plan import ConfigError, validate_config
from deit_jax.progress import fmt_time, log

# Heads in table order, with the names the table uses.
HEADS = {"cls": "class head", "dist": "distillation head", "both": "both heads"}


def is_experiment(config) -> bool:
  return "experiment" in config and "students" in config


def _copy(config) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def stages(config, workdir: str) -> list[dict[str, Any]]:
  """Every run of the experiment in training order: {'name', 'seed', 'config', 'workdir'}."""
  if not config.students:
    raise ConfigError(f"The experiment {config.experiment!r} has no students.")
  seeds = [int(s) for s in (config.seeds if isinstance(config.seeds, (tuple, list))
                            else [config.seeds])]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ConfigError(f"config.seeds={config.seeds!r}: give distinct seeds, e.g. "
                      "--config.seeds=0,1,2.")
  given = config.get("teacher_checkpoint") or ""
  teacher_dir = os.path.join(workdir, "teacher")
  out = [] if given else [{"name": "teacher", "seed": int(config.teacher.seed),
                           "config": _copy(config.teacher), "workdir": teacher_dir}]
  if given and not os.path.isdir(given):
    raise ConfigError(f"config.teacher_checkpoint={given}: no such directory; give a teacher "
                      "checkpoint (e.g. from `python -m deit_jax.convert`) or '' to train "
                      "config.teacher.")
  for seed in seeds:
    for name, student in config.students.items():
      c = _copy(student)
      c.seed = seed
      c.teacher.checkpoint = given or os.path.join(teacher_dir, "checkpoints")
      c.teacher.source = "model"
      out.append({"name": name, "seed": seed, "config": c, "workdir": os.path.join(
          workdir, name if seed == seeds[0] else f"{name}_seed{seed}")})
  return out


def _validate(runs: list[dict]):
  """Every run's config is checked before the first one trains."""
  trains_teacher = runs[0]["name"] == "teacher"
  for r in runs:
    try:
      validate_config(r["config"], jax.device_count(),
                      teacher_pending=trains_teacher and r is not runs[0])
    except ConfigError as e:
      raise ConfigError(f"config.{'teacher' if r['name'] == 'teacher' else 'students.' + r['name']}"
                        f": {e}") from e
  if sum(r["name"] == "teacher" for r in runs) > (runs[0]["name"] == "teacher"):
    raise ConfigError("A student may not be named 'teacher' (that folder holds the teacher).")


def _head_numbers(results: dict[str, float]) -> dict[str, dict[str, float]]:
  """{head: {'top1', 'agree'}} of the student's heads from run_eval's results (`by_head`;
  agreement only when it was measured)."""
  rows = evaluation.by_head(results)
  return {head: {m: rows[name][m] for m in ("top1", "agree") if m in rows[name]}
          for head, name in evaluation.HEAD_NAMES.items() if head in HEADS and name in rows}


def run_experiment(config, workdir: str) -> dict[str, Any]:
  """Trains and evaluates every run (`stages`), then writes and prints the results table."""
  from deit_jax import run, train  # the trainer and evaluation, only when an experiment runs
  workdir = os.path.abspath(workdir)
  runs = stages(config, workdir)
  _validate(runs)
  log(f"Experiment {config.experiment!r} in {workdir}: " + ", ".join(
      f"{r['name']} (seed {r['seed']})" for r in runs) + ".")
  t_all = time.time()
  rows = []
  for r in runs:
    t = time.time()
    log(f"--- {r['name']}, seed {r['seed']}: {r['workdir']}")
    result = train.train_and_evaluate(r["config"], r["workdir"])
    if result.get("preempted"):
      return result  # saved; the same command continues where it stopped
    # The run's last eval (with the teacher's agreement); a run's record without it: eval again.
    evaluated = result if "eval/top1" in result else run.run_eval(r["config"], r["workdir"])
    rows.append({"name": r["name"], "seed": r["seed"], "workdir": r["workdir"],
                 "kind": "teacher" if r is runs[0] and r["name"] == "teacher" else
                 r["config"].distillation.kind,
                 "heads": _head_numbers(evaluated), "ema_top1": evaluated.get("eval/ema_top1"),
                 "token_cos": evaluated.get("eval/token_cos"),
                 "teacher_top1": evaluated.get("eval/teacher_top1"),
                 "images": evaluated.get("eval/count"), "wall_s": round(time.time() - t, 1)})
  report = summarize(config, rows)
  report["wall_s"] = round(time.time() - t_all, 1)
  markdown = results_markdown(report)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(report, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(markdown)
  log("\n" + markdown + f"\nWritten to {workdir}/results.md and results.json "
      f"({fmt_time(report['wall_s'])} in this invocation).")
  return report


def _stats(values: list[float]) -> dict[str, float]:
  return {"mean": statistics.fmean(values), "n": len(values),
          "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def summarize(config, rows: list[dict]) -> dict[str, Any]:
  """Per student and head: mean and std over seeds of top-1 and of agreement with the teacher,
  and the paired difference (same seed) against the first student without distillation."""
  trained = [r for r in rows if r["kind"] == "teacher"]
  students = [r for r in rows if r["kind"] != "teacher"]
  measured = [r["teacher_top1"] for r in students if r["teacher_top1"] is not None]
  teacher = {"top1": trained[0]["heads"]["cls"]["top1"] if trained else
             (measured[0] if measured else None),
             "workdir": trained[0]["workdir"] if trained else None,
             "checkpoint": config.get("teacher_checkpoint") or None}
  baseline = next((r["name"] for r in students if r["kind"] == "none"), None)
  # What each run reports as its result: both heads averaged, or a one-head model's class head.
  base_top1 = {r["seed"]: (r["heads"].get("both") or r["heads"]["cls"])["top1"]
               for r in students if r["name"] == baseline}
  out = {"experiment": config.experiment, "seeds": sorted({r["seed"] for r in students}),
         "teacher": teacher,
         "baseline": baseline, "students": {}, "runs": rows}
  names = list(dict.fromkeys(r["name"] for r in students))
  for name in sorted(names, key=lambda n: (n != baseline, names.index(n))):  # baseline first
    mine = [r for r in students if r["name"] == name]
    entry = {"kind": mine[0]["kind"], "heads": {}}
    for head in HEADS:
      if head not in mine[0]["heads"]:
        continue
      h = {"top1": _stats([r["heads"][head]["top1"] for r in mine])}
      if all("agree" in r["heads"][head] for r in mine):
        h["agree"] = _stats([r["heads"][head]["agree"] for r in mine])
      paired = [r["heads"][head]["top1"] - base_top1[r["seed"]] for r in mine
                if r["seed"] in base_top1]
      if baseline is not None and name != baseline and paired:
        h["vs_baseline"] = _stats(paired)
      entry["heads"][head] = h
    out["students"][name] = entry
  return out


def _pm(s: dict[str, float] | None, signed: bool = False) -> str:
  if s is None:
    return ""
  text = f"{s['mean']:+.2f}" if signed else f"{s['mean']:.2f}"
  return text + (f" ± {s['std']:.2f}" if s["n"] > 1 else "")


def _number(value) -> str:
  return "" if value is None else f"{value:.2f}"


def results_markdown(report: dict[str, Any]) -> str:
  """The results table: the teacher, then each student's heads (a one-head student: its class
  head; a distilled one: class, distillation, both), mean ± std over the seeds."""
  n = len(report["seeds"])
  seeds = f"{n} seed{'s' if n > 1 else ''} ({', '.join(map(str, report['seeds']))})"
  base = report["baseline"]
  lines = [f"Experiment `{report['experiment']}`: eval top-1 (%), {seeds}"
           + (", mean ± std" if n > 1 else "") + ".", "",
           f"| run | head | top-1 | vs {base or 'no distillation'} (same seed) "
           "| agrees with teacher |", "|---|---|---:|---:|---:|",
           f"| teacher | | {_number(report['teacher']['top1'])} | | |"]
  for name, entry in report["students"].items():
    heads = entry["heads"]
    for i, (head, h) in enumerate(heads.items()):
      label = HEADS[head] if len(heads) > 1 else "class head (the only one)"
      lines.append(f"| {name if i == 0 else ''} | {label} | {_pm(h['top1'])} | "
                   f"{_pm(h.get('vs_baseline'), signed=True)} | {_pm(h.get('agree'))} |")
  return "\n".join(lines) + "\n"
