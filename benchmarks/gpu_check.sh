#!/usr/bin/env bash
# One prepared GPU speed check (about 5-6 minutes on one H200; its two runs are capped at
# 130 s + 290 s, so it ends in under 8 minutes whatever happens):
#   DeiT-S and DeiT-B (distilled, 224 px) in bfloat16 on our train step:
#     student alone, RegNetY-16GF teacher in the step, precomputed teacher outputs;
#   inference; img/s, MFU (against the table peak of the device), compile s, peak memory;
#   XLA vs cuDNN attention (config.model_kw.attention_impl) for the train step and inference;
#   timm (torch eager, bf16 autocast, the official DeiT step) side by side when torch + timm
#   are importable (GPU_CHECK_TIMM=0 turns it off).
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine, from the repo root
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh     # the same code paths on CPU, tiny (< 2 min)
#
# Results: $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/gpu_check.log if $OUT is set, else
# ./gpu_check_out/. The table is printed at the end.
#
# The GPU machine has no internet, no TensorFlow and no ml_collections. The benchmark needs no
# TensorFlow (deit_jax imports it on first use, for tf.data only); ml_collections comes from
# a wheel carried in the git-ignored folder .whl/. Prepare it once, here, with internet:
#   pip download --no-deps -d .whl ml-collections==1.1.0
#   echo /.whl/ >> .git/info/exclude
# and name ".whl" in the device run's carry list (ignored paths travel only when carried).
# ml_collections needs absl-py and PyYAML, which jax/chex/orbax and timm already bring.
#
# Knobs: PYTHON (default python), TIMM_PYTHON (default $PYTHON), GPU_CHECK_TIMM (1),
#        GPU_CHECK_ITERS (10), GPU_CHECK_ROUNDS (2), GPU_CHECK_TRAIN_BATCH (256),
#        GPU_CHECK_INFER_BATCH (512).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PY=${PYTHON:-python}
DRY=${GPU_CHECK_DRY:-0}
DEST=${OUT:-./gpu_check_out}
mkdir -p "$DEST"
WORK=$(mktemp -d)
LOG="$DEST/gpu_check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

# --- ml_collections from the carried wheel, if it is not installed ---------------------------
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  whl=$(ls .whl/ml_collections-*.whl 2>/dev/null | head -1)
  if [ -z "$whl" ]; then
    say "ml_collections is not importable and no wheel is in .whl/: run, where there is internet,"
    say "  pip download --no-deps -d .whl ml-collections==1.1.0  (and carry .whl)"
    exit 1
  fi
  "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site "$whl" >>"$LOG" 2>&1 \
    || { say "pip install of $whl failed (see $LOG)"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  say "installed $(basename "$whl") into /tmp/site"
fi
"$PY" -c "import yaml, absl" 2>/dev/null || { say "ml_collections needs PyYAML and absl-py"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# --- what to run ---------------------------------------------------------------------------
ITERS=${GPU_CHECK_ITERS:-10}
ROUNDS=${GPU_CHECK_ROUNDS:-2}
WARMUP=2
TB=${GPU_CHECK_TRAIN_BATCH:-256}
IB=${GPU_CHECK_INFER_BATCH:-512}
ROWS=deit_s,deit_b
IMPL_A=xla    # attention impl of the A/B comparison (train + inference only)
IMPL_B=cudnn  # the full run (all variants, timm beside it)
T_A=130
T_B=290
if [ "$DRY" = 1 ]; then
  # Same invocations, tiny: the demo student (a distilled DeiT) with its regnety_002 teacher
  # stands in for DeiT-S/B with RegNetY-16GF; cuDNN does not exist on CPU, so the second
  # attention setting is jax's default.
  export JAX_PLATFORMS=cpu
  ROWS=demo; TB=8; IB=16; ITERS=1; ROUNDS=1; WARMUP=1
  IMPL_B=default
  T_A=100; T_B=150
fi
TIMM_ARGS=()
if [ "${GPU_CHECK_TIMM:-1}" = 1 ]; then
  TPY=${TIMM_PYTHON:-$PY}
  if "$TPY" -c "import torch, timm" 2>/dev/null; then
    TIMM_ARGS=(--timm-python "$TPY")
    # torch shares the GPU with XLA's preallocated pool: leave it room.
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
  else
    say "timm/torch not importable with $TPY: no timm comparison"
  fi
fi
COMMON=(--rows "$ROWS" --dtype bfloat16 --train-batch "$TB" --infer-batch "$IB"
        --iters "$ITERS" --warmup "$WARMUP" --rounds "$ROUNDS")

say "== gpu_check: $(date -u +%FT%TZ) dry=$DRY rows=$ROWS train batch $TB, infer batch $IB"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader 2>&1 | tee -a "$LOG"

# A: attention $IMPL_A, train (student alone) + inference.
say "== A: attention=$IMPL_A (train, inference), limit ${T_A}s"
timeout -k 10 "$T_A" "$PY" benchmarks/speed.py "${COMMON[@]}" --attention "$IMPL_A" \
  --variants train,infer --json "$WORK/a.json" 2>&1 | tee -a "$LOG"
RC_A=${PIPESTATUS[0]}
# B: attention $IMPL_B, every variant, timm beside it.
say "== B: attention=$IMPL_B (all variants${TIMM_ARGS:+, timm}), limit ${T_B}s"
timeout -k 10 "$T_B" "$PY" benchmarks/speed.py "${COMMON[@]}" --attention "$IMPL_B" \
  ${TIMM_ARGS[@]+"${TIMM_ARGS[@]}"} --json "$WORK/b.json" 2>&1 | tee -a "$LOG"
RC_B=${PIPESTATUS[0]}
say "== exit status: A $RC_A, B $RC_B (124: hit its time limit; partial rows are kept)"

# --- merge: one JSON, one Markdown table, the attention comparison --------------------------
"$PY" - "$WORK/a.json" "$WORK/b.json" "$DEST" "$IMPL_A" "$IMPL_B" "$DRY" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
sys.path.insert(0, "benchmarks")
import speed  # noqa: E402  (table formatting only)

a_path, b_path, dest, impl_a, impl_b, dry = sys.argv[1:7]
runs = {}
for tag, path in (("A", a_path), ("B", b_path)):
  if os.path.exists(path):
    with open(path) as f:
      runs[tag] = json.load(f)
results = [r for tag in ("A", "B") if tag in runs for r in runs[tag]["results"]]
header = dict(runs.get("B", runs.get("A", {})).get("header", {}))
notes = list(runs.get("B", runs.get("A", {})).get("notes", []))
header["gpu_check"] = ("dry run on CPU (tiny stand-ins)" if dry == "1" else
                       "bash benchmarks/gpu_check.sh")

def by(row, variant):
  return next((r for r in results if r["row"] == row and r["variant"] == variant
               and not r.get("error")), None)

compare = []
models = sorted({r["row"].split("/")[0] for r in results}, key=lambda m: m)
for m in models:
  for v in ("train", "infer"):
    ra, rb = by(f"{m}/{impl_a}", v), by(f"{m}/{impl_b}", v)
    if ra and rb:
      compare.append({"model": m, "variant": v, f"{impl_a}_img_s": ra["ours_img_s"],
                      f"{impl_b}_img_s": rb["ours_img_s"],
                      "ratio": rb["ours_img_s"] / ra["ours_img_s"],
                      f"{impl_a}_compile_s": ra["compile_s"], f"{impl_b}_compile_s": rb["compile_s"],
                      f"{impl_a}_mfu": ra.get("mfu"), f"{impl_b}_mfu": rb.get("mfu")})
md = speed.markdown_table(header, results, notes).rstrip("\n").split("\n")
md += ["", f"## Attention: {impl_b} vs {impl_a} (our step, img/s)", "",
       f"| model | variant | {impl_a} img/s | {impl_b} img/s | {impl_b}/{impl_a} | {impl_a} MFU | "
       f"{impl_b} MFU |", "|---|---|---:|---:|---:|---:|---:|"]
pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
for c in compare:
  md.append(f"| {c['model']} | {speed.LABELS[c['variant']]} | {c[impl_a + '_img_s']:,.0f} | "
            f"{c[impl_b + '_img_s']:,.0f} | {c['ratio']:.2f} | {pct(c[impl_a + '_mfu'])} | "
            f"{pct(c[impl_b + '_mfu'])} |")
failed = [r for r in results if r.get("error")]
if failed:
  md += ["", "## Failed", ""] + [f"- {r['row']} {r['variant']}: {r['error']}" for r in failed]
if not runs:
  md += ["", "No results: both runs failed before their first row (see gpu_check.log)."]
with open(os.path.join(dest, "gpu_check.json"), "w") as f:
  json.dump({"header": header, "results": results, "attention": compare, "runs": runs}, f,
            indent=2)
with open(os.path.join(dest, "gpu_check.md"), "w") as f:
  f.write("\n".join(md) + "\n")
print("\n".join(md))
EOF
rm -rf "$WORK"
say "== gpu_check done in $((SECONDS - START)) s; results in $DEST/gpu_check.{json,md,log}"
