#!/usr/bin/env bash
# The main job on the embedded synthetic data set: generate it, shard it, train on it.
# Every step is resumable: rerunning skips finished work. Fold 9 is validated on for display, not
# chosen on: best.pt is the last epoch (--select-on last), so fold 9 can be scored with it honestly.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
SHARDS=${SHARDS:-shards/synthetic}

[ -f "$DATA/candidates.csv" ] || python -m luna_dist.synth "$DATA" --cts "${CTS:-40}" --seed 0
python -m luna_dist.shard --data "$DATA" --out "$SHARDS"
# accelerate launch gives a process one CPU thread unless told otherwise: on a machine without
# an accelerator the CPU does the training, so let it use every core.
THREADS=$(python -c "import os; print(os.cpu_count())")
# A saved state (under any name a kill left it) is continued; a run folder without one holds nothing to keep.
RESUME=$(compgen -G "runs/demo/state*" >/dev/null && echo --resume || { [ -d runs/demo ] && echo --overwrite; } || true)
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    --num_cpu_threads_per_process "$THREADS" \
    launch/train.py --shards "$SHARDS" --run-name demo $RESUME --select-on last \
    --epochs "${EPOCHS:-5}" --epoch-samples 2048 --balanced 1 --augment --momentum 0.9
echo "TensorBoard logs: runs/demo (tensorboard --logdir runs)"
