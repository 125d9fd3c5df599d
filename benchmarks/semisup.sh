#!/usr/bin/env bash
# make semisup: the SimCLRv2 semi-supervised chain on the Fashion-MNIST demo set (60k train / 10k test),
# on CPU, at 1 % and 10 % of the labels, with the baselines. Writes $OUT/results.json and results.md
# (and, for a full run, benchmarks/results/semisup_demo.{json,md}). See docs/semisup.md.
#
#   bash benchmarks/semisup.sh                     # the full chain, about an hour on 2 cores
#   SEMISUP_QUICK=1 bash benchmarks/semisup.sh     # smoke run: every step for a few steps, minutes
#
# Environment:
#   SEMISUP_OUT=runs/semisup      run directories (one per step); a finished step is skipped on rerun,
#                                 an interrupted one resumes (--run.resume=auto)
#   SEMISUP_QUICK=0|1             smoke run: tiny schedules, a 1000-image val subset; results not saved
#                                 under benchmarks/results
#   SEMISUP_PRETRAIN=DIR          reuse this pretrain.py run (e.g. runs/demo from `make demo`) instead
#                                 of pretraining here
#   SEMISUP_PRETRAIN_EPOCHS=4     SimCLR pretraining epochs (what each costs and buys:
#                                 benchmarks/README.md, docs/semisup.md)
#   SEMISUP_TEACHER_DEPTH=18      ResNet depth of the pretrained/fine-tuned network (18 or 34); the
#                                 distillation student is always R18, so 34 makes it a smaller student
#   SEMISUP_SCRATCH_ARGS=""       extra finetune.py options for the supervised-from-scratch baseline
#                                 (default: the fine-tuning recipe unchanged, e.g. "--optim.lr=1.0")
#   SEMISUP_THREADS=2             torch threads per process
#   PY=.venv/bin/python           interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${SEMISUP_OUT:-runs/semisup}
QUICK=${SEMISUP_QUICK:-0}
PRE_EPOCHS=${SEMISUP_PRETRAIN_EPOCHS:-4}
DEPTH=${SEMISUP_TEACHER_DEPTH:-18}
export OMP_NUM_THREADS=${SEMISUP_THREADS:-2}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
TIMES="$OUT/timings.jsonl"
COMMON=(--run.progress=false)

# ---------------------------------------------------------------------------------------------- helpers
finished() {  # a step is done when the last line of its log is the "done" record
  [ -f "$1/log.jsonl" ] && tail -n 1 "$1/log.jsonl" | grep -q '"event": "done"'
}

step() {  # step NAME RUN_DIR SCRIPT ARGS... : run a training script unless already finished, timed
  local name=$1 dir=$2 script=$3; shift 3
  if finished "$dir"; then echo "== $name: done already ($dir)"; return; fi
  echo "== $name: $PY fastclr/$script $*"
  local t0=$SECONDS
  "$PY" "fastclr/$script" "$@" --run.out_dir="$dir" "${COMMON[@]}"
  echo "{\"step\": \"$name\", \"dir\": \"$dir\", \"seconds\": $((SECONDS - t0))}" >> "$TIMES"
}

# ---------------------------------------------------------------------------------------------- data
DEMO=$("$PY" -m loaders.demo_data | tail -n 1)   # prepares the demo set on first use (~30 s)
VAL="$DEMO/val"
if [ "$QUICK" = 1 ]; then
  # smoke run: score on a class-balanced 1000-image subset of the test set (symlinks)
  VAL="$OUT/val_1000"
  if [ ! -d "$VAL" ]; then
    "$PY" -m benchmarks.semisup_report val-subset "$DEMO/val" "$VAL"
  fi
fi
DATA=(--data.path="$DEMO/train" --run.val_path="$VAL")

# Schedules: the presets (docs/semisup.md), shortened in a smoke run.
if [ "$QUICK" = 1 ]; then
  PRE_X=(--run.max_steps=10 --run.knn_eval=false)
  FT_X=(--optim.epochs=2 --run.eval_every=0)
  DI_X=(--run.max_steps=5 --run.eval_every=0)
  LE_X=(--optim.epochs=3 --run.eval_every=0)
else
  # demo_cpu stops at 180 steps (the 3-minute demo); here the epochs decide
  PRE_X=(--optim.epochs="$PRE_EPOCHS" --run.max_steps=none)
  FT_X=(); DI_X=(); LE_X=()
fi

# ---------------------------------------------------------------------------------------------- 1. SimCLR
if [ -n "${SEMISUP_PRETRAIN:-}" ]; then
  PRE=$SEMISUP_PRETRAIN
  echo "== pretrain: reusing $PRE"
else
  PRE="$OUT/pretrain"
  step pretrain "$PRE" pretrain.py demo_cpu --data.path="$DEMO/train" --run.val_path="$DEMO/val" \
    --model.depth="$DEPTH" --run.resume=auto "${PRE_X[@]}"
fi

# ---------------------------------------------------------------------------------------------- 2. per label fraction
for F in 1pct 10pct; do
  # logistic regression on raw pixels: the floor every learned representation must beat
  step "raw_pixels_$F" "$OUT/raw_pixels_$F" linear_eval.py "demo_$F" --raw_pixels=true "${DATA[@]}" "${LE_X[@]}"
  # supervised from scratch: the same network and fine-tuning recipe, random init
  # shellcheck disable=SC2086  # SEMISUP_SCRATCH_ARGS: word-split on purpose
  step "scratch_$F" "$OUT/scratch_$F" finetune.py "demo_$F" --ckpt=none --model.depth="$DEPTH" "${DATA[@]}" \
    --run.resume=auto "${FT_X[@]}" ${SEMISUP_SCRATCH_ARGS:-}
  # SimCLR features, linear evaluation (frozen backbone)
  step "linear_$F" "$OUT/linear_$F" linear_eval.py "demo_$F" --ckpt="$PRE" "${DATA[@]}" "${LE_X[@]}"
  # SimCLRv2 step 2: fine-tune from the first projection-head layer
  step "finetune_$F" "$OUT/finetune_$F" finetune.py "demo_$F" --ckpt="$PRE" "${DATA[@]}" --run.resume=auto "${FT_X[@]}"
  # SimCLRv2 step 3: distill on all 60k unlabeled images
  #   into an R18 student from scratch (tau = 1, the big-to-small recipe) ...
  step "distill_$F" "$OUT/distill_$F" distill.py demo_distill --teacher="$OUT/finetune_$F" --model.depth=18 \
    "${DATA[@]}" --run.resume=auto "${DI_X[@]}"
  #   ... and into the teacher's own architecture, started from the same SimCLR weights (tau = 0.1)
  step "self_distill_$F" "$OUT/self_distill_$F" distill.py demo_self_distill --teacher="$OUT/finetune_$F" \
    --student_ckpt="$PRE" "${DATA[@]}" --run.resume=auto "${DI_X[@]}"
done

# ---------------------------------------------------------------------------------------------- 3. results
SAVE=""
[ "$QUICK" = 1 ] || SAVE="benchmarks/results/semisup_demo"
"$PY" -m benchmarks.semisup_report results "$OUT" "$QUICK" "$DEPTH" "$PRE" "$SAVE"
