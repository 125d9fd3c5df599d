#!/usr/bin/env bash
# make semisup: the SimCLRv2 semi-supervised chain on the Fashion-MNIST demo set (60k train / 10k test),
# at 1 % and 10 % of the labels, with the baselines, on CPU (or, SEMISUP_DEVICE=cuda, at GPU scale).
# Writes $OUT/results.json and results.md (and, for a full run, experiments/results/semisup_demo.{json,md},
# or semisup_gpu.{json,md} on a GPU). See docs/semisup.md.
#
#   bash experiments/semisup.sh                     # the full chain, about an hour on 2 cores
#   SEMISUP_QUICK=1 bash experiments/semisup.sh     # smoke run: every step for a few steps, minutes
#   SEMISUP_DEVICE=cuda bash experiments/semisup.sh # the GPU variant (gpu_suite.sh's semisup phase)
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
#   SEMISUP_DEVICE=cpu|cuda       cuda: the same chain and presets at GPU scale (bf16, eager, DataLoader
#                                 workers), longer schedules below; out dir runs/semisup_gpu
#   SEMISUP_SAVE                  where a full run's results are also written (SAVE.json, SAVE.md; default
#                                 experiments/results/semisup_demo, on cuda semisup_gpu; empty: nowhere)
#   SEMISUP_WORKERS               DataLoader workers per step (cpu: the presets' 2; cuda: cores - 2, <= 12)
#   PY=.venv/bin/python           interpreter (falls back to python3)
# The Fashion-MNIST files come from Debian's package, or from $FASTCLR_FMNIST (loaders/demo_data.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEVICE=${SEMISUP_DEVICE:-cpu}
case "$DEVICE" in
  cpu|cuda) ;;
  *) echo "semisup.sh: SEMISUP_DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;;
esac
if [ "$DEVICE" = cuda ]; then
  OUT=${SEMISUP_OUT:-runs/semisup_gpu}
  PRE_EPOCHS=${SEMISUP_PRETRAIN_EPOCHS:-40}
else
  OUT=${SEMISUP_OUT:-runs/semisup}
  PRE_EPOCHS=${SEMISUP_PRETRAIN_EPOCHS:-4}
fi
QUICK=${SEMISUP_QUICK:-0}
DEPTH=${SEMISUP_TEACHER_DEPTH:-18}
export OMP_NUM_THREADS=${SEMISUP_THREADS:-2}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
TIMES="$OUT/timings.jsonl"
COMMON=(--run.progress=false)
if [ "$DEVICE" = cuda ]; then
  # Every step on the GPU in bf16, eagerly: each step is its own process of seconds to a minute, where
  # torch.compile's and the fused colour ops' compile time (tens of seconds per process) would cost more
  # than it saves. The colour ops run as "where" (whole batch, masked: no host sync, no compile).
  CORES=$(nproc 2>/dev/null || echo 4)
  W=${SEMISUP_WORKERS:-$(( CORES > 14 ? 12 : (CORES > 3 ? CORES - 2 : 1) ))}
  COMMON+=(--run.device=cuda --run.precision=bf16 --data.num_workers="$W"
           --model.compile=false --run.cuda_graphs=false --data.photometry_mode=where)
elif [ -n "${SEMISUP_WORKERS:-}" ]; then
  COMMON+=(--data.num_workers="$SEMISUP_WORKERS")
fi

# ---------------------------------------------------------------------------------------------- helpers
finished() {  # a step is done when the last line of its log is the "done" record
  [ -f "$1/log.jsonl" ] && tail -n 1 "$1/log.jsonl" | grep -q '"event": "done"'
}

step() {  # step NAME RUN_DIR SCRIPT PRESET ARGS... : run a training script unless already finished, timed
  local name=$1 dir=$2 script=$3; shift 3
  if finished "$dir"; then echo "== $name: done already ($dir)"; return; fi
  echo "== $name: $PY fastclr/$script $*"
  local t0=$SECONDS
  # COMMON after the preset, before the step's own options: a step may override it
  "$PY" "fastclr/$script" "$1" "${COMMON[@]}" "${@:2}" --run.out_dir="$dir"
  echo "{\"step\": \"$name\", \"dir\": \"$dir\", \"seconds\": $((SECONDS - t0))}" >> "$TIMES"
}

# ---------------------------------------------------------------------------------------------- data
DEMO=$("$PY" -m loaders.demo_data | tail -n 1)   # prepares the demo set on first use (~30 s)
VAL="$DEMO/val"
if [ "$QUICK" = 1 ]; then
  # smoke run: score on a class-balanced 1000-image subset of the test set (symlinks)
  VAL="$OUT/val_1000"
  if [ ! -d "$VAL" ]; then
    "$PY" -m experiments.semisup_report val-subset "$DEMO/val" "$VAL"
  fi
fi
DATA=(--data.path="$DEMO/train" --run.val_path="$VAL")

# Schedules: the presets (docs/semisup.md), shortened in a smoke run.
if [ "$QUICK" = 1 ]; then
  PRE_X=(--run.max_steps=10 --run.knn_eval=false)
  FT_X=(--optim.epochs=2 --run.eval_every=0 --min_steps=0)  # min_steps would stretch 2 epochs to 400 steps
  DI_X=(--run.max_steps=5 --run.eval_every=0)
  LE_X=(--optim.epochs=3 --run.eval_every=0)
else
  PRE_X=(--optim.epochs="$PRE_EPOCHS")
  FT_X=(); DI_X=(); LE_X=()
fi
FT10_X=()
if [ "$DEVICE" = cuda ] && [ "$QUICK" != 1 ]; then
  # GPU scale: batch 512 for pretraining (lr 0.3 * B/256, the preset's rule) and the schedules the CPU
  # presets shorten for time: fine-tuning on 10 % for the paper's 30 epochs, distillation for 10 passes.
  PRE_X+=(--optim.global_batch_size=512 --optim.warmup_epochs=2)
  FT10_X=(--optim.epochs=30 --run.eval_every=5)
  DI_X=(--optim.epochs=10 --optim.global_batch_size=512 --run.eval_every=0)
fi

# ---------------------------------------------------------------------------------------------- 1. SimCLR
if [ -n "${SEMISUP_PRETRAIN:-}" ]; then
  PRE=$SEMISUP_PRETRAIN
  echo "== pretrain: reusing $PRE"
else
  PRE="$OUT/pretrain"
  step pretrain "$PRE" pretrain.py semisup_cpu --data.path="$DEMO/train" --run.val_path="$DEMO/val" \
    --model.depth="$DEPTH" --run.resume=auto "${PRE_X[@]}"
fi

# ---------------------------------------------------------------------------------------------- 2. per label fraction
for F in 1pct 10pct; do
  # logistic regression on raw pixels: the floor every learned representation must beat
  # (in fp32 on every device: these are the pixels themselves, not a network's bf16 input)
  step "raw_pixels_$F" "$OUT/raw_pixels_$F" linear_eval.py "demo_$F" --raw_pixels=true --run.precision=fp32 \
    "${DATA[@]}" --run.resume=auto "${LE_X[@]}"
  # supervised from scratch: the same network and fine-tuning recipe, random init
  FX=("${FT_X[@]}")
  if [ "$F" = 10pct ]; then FX+=("${FT10_X[@]}"); fi
  # shellcheck disable=SC2086  # SEMISUP_SCRATCH_ARGS: word-split on purpose
  step "scratch_$F" "$OUT/scratch_$F" finetune.py "demo_$F" --ckpt=none --model.depth="$DEPTH" "${DATA[@]}" \
    --run.resume=auto "${FX[@]}" ${SEMISUP_SCRATCH_ARGS:-}
  # SimCLR features, linear evaluation (frozen backbone)
  step "linear_$F" "$OUT/linear_$F" linear_eval.py "demo_$F" --ckpt="$PRE" "${DATA[@]}" --run.resume=auto "${LE_X[@]}"
  # SimCLRv2 step 2: fine-tune from the first projection-head layer
  step "finetune_$F" "$OUT/finetune_$F" finetune.py "demo_$F" --ckpt="$PRE" "${DATA[@]}" --run.resume=auto "${FX[@]}"
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
if [ "$QUICK" != 1 ]; then
  SAVE="experiments/results/semisup_demo"
  if [ "$DEVICE" = cuda ]; then SAVE="experiments/results/semisup_gpu"; fi
fi
SAVE=${SEMISUP_SAVE-$SAVE}
"$PY" -m experiments.semisup_report results "$OUT" "$QUICK" "$DEPTH" "$PRE" "$SAVE" --device="$DEVICE"
