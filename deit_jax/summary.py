"""What a training workdir holds, in a few lines for the person who ran it: the final eval of
every head, the best one, where the checkpoints are, the wall time and the commands to run next.

Built from the files on disk only (metrics.jsonl, best.json, checkpoints/, best/), so a run that
just ended and a finished run started again print the same summary; `train` prints it at the end
of a run and writes it to `<workdir>/summary.md`.
"""

from __future__ import annotations

import json
import os
import shlex

from deit_jax import checkpoint, evaluation
from deit_jax.progress import fmt_time

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.md"
WALL_KEY = "train/wall_s"  # seconds of training so far, summed over the run's invocations
# The eval keys `evaluation.table` shows; any other eval/* key is listed after it.
_TABLED = ({f"eval/{head}_{m}" for head in evaluation.HEAD_NAMES for m in ("top1", "top5", "agree")}
           | {"eval/top1", "eval/top5", "eval/count", "eval/token_cos"})


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl` ([] without one; a torn line is skipped)."""
  path, records = os.path.join(workdir, METRICS_FILE), []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except ValueError:
          continue
  return records


def last_eval(records: list[dict]) -> dict:
  """The eval metrics of the last record holding any, with its "step" ({} if none has)."""
  for r in reversed(records):
    metrics = {k: v for k, v in r.items() if k.startswith("eval/")}
    if metrics:
      return {"step": r.get("step"), **metrics}
  return {}


def wall_time(records: list[dict]) -> float | None:
  """The last recorded training wall time in seconds (None if none is)."""
  return next((r[WALL_KEY] for r in reversed(records) if WALL_KEY in r), None)


def launch_command(config_spec: str | None, workdir: str) -> str:
  """`python launch.py --config SPEC --workdir DIR`, `<config>` standing for an unknown spec."""
  spec = shlex.quote(config_spec) if config_spec else "<config>"
  return f"python launch.py --config {spec} --workdir {shlex.quote(workdir)}"


def _is_deit(ckpt_dir: str, step: int) -> bool:
  try:
    return checkpoint.read_description(ckpt_dir, step)[0].get("family") == "deit"
  except Exception:  # noqa: BLE001 - an unreadable description: no pictures to suggest
    return False


def _eval_lines(final: dict) -> list[str]:
  if "eval/count" not in final or "eval/top1" not in final:
    return ["Final eval: none recorded in metrics.jsonl."]
  lines = [f"Final eval (step {final['step']}):"]
  lines += ["    " + line for line in evaluation.table(final).splitlines()]
  other = sorted(k for k in final if k.startswith("eval/") and k not in _TABLED)
  if other:
    lines.append("    also: " + ", ".join(f"{k[5:]} {final[k]:.4g}" for k in other))
  return lines


def _best_line(workdir: str) -> str | None:
  path = os.path.join(workdir, "best.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    best = json.load(f)
  if best.get("step") is None:
    return None
  return (f"Best: {best.get('metric', 'eval/top1')} {best['value']:.2f} at step {best['step']}, "
          f"in {os.path.join(workdir, 'best', str(best['step']))}.")


def build(workdir: str, config_spec: str | None = None) -> str:
  """The summary of the training run in `workdir`; the next commands name `config_spec` (the
  --config argument, e.g. configs/demo_distill.py:hard) and `workdir` as given."""
  records = read_metrics(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = checkpoint.step_folders(ckpt_dir)
  lines = [f"Summary of {workdir}" + (f" (step {steps[-1]}):" if steps else ":")]
  lines += _eval_lines(last_eval(records))
  best = _best_line(workdir)
  if best:
    lines.append(best)
  if steps:
    lines.append(f"Checkpoints: {os.path.join(ckpt_dir, str(steps[-1]))} (last; all kept "
                 f"steps: {', '.join(map(str, steps))}).")
  wall = wall_time(records)
  if wall is not None:
    lines.append(f"Training wall time: {fmt_time(wall)}.")
  run = launch_command(config_spec, workdir)
  lines += ["Next (add the run's --config.* overrides, if any):", f"    {run} --mode=eval"]
  if steps and _is_deit(ckpt_dir, steps[-1]):
    lines.append(f"    {run} --mode=visualize")
  lines.append(f"    tensorboard --logdir {shlex.quote(os.path.join(workdir, 'tensorboard'))}")
  return "\n".join(lines)


def write(workdir: str, text: str):
  """`<workdir>/summary.md` (written whole, then renamed over the old one)."""
  path = os.path.join(workdir, SUMMARY_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(text + "\n")
  os.replace(path + ".tmp", path)


def stopped(workdir: str, step: int, total: int, why: str, config_spec: str | None = None) -> str:
  """What a run stopped before its end (SIGTERM, max_steps) says: how to resume it."""
  return (f"Stopped at step {step}/{total} ({why}); its checkpoint is in "
          f"{os.path.join(workdir, 'checkpoints', str(step))}.\nResume it exactly by running the "
          f"same command again (with its --config.* overrides, if any):\n"
          f"    {launch_command(config_spec, workdir)}")
