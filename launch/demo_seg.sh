#!/usr/bin/env bash
# Segmentation on the embedded synthetic data set: generate it (shared with demo.sh), build
# the segmentation shards, train the UNet a few minutes. Rerunning skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
SHARDS=${SHARDS:-shards/synthetic-seg}
RUN=${RUN:-seg-demo}

[ -f "$DATA/candidates.csv" ] || python -m luna_dist.synth "$DATA" --cts "${CTS:-40}" --seed 0
python -m luna_dist.shard --task seg --data "$DATA" --out "$SHARDS"
# As in demo.sh: on a machine without an accelerator the CPU trains, with every core.
THREADS=$(python -c "import os; print(os.cpu_count())")
RESUME=$(compgen -G "runs/$RUN/state*" >/dev/null && echo --resume || { [ -d "runs/$RUN" ] && echo --overwrite; } || true)
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    --num_cpu_threads_per_process "$THREADS" \
    launch/train.py --task seg --shards "$SHARDS" --run-name "$RUN" $RESUME --select-on last \
    --epochs "${EPOCHS:-10}" --epoch-samples 2048 --batch-size 16 --augment --seed "${SEED:-0}"
echo "TensorBoard logs: runs/$RUN (tensorboard --logdir runs)"
