#!/usr/bin/env bash
# The main job on the embedded synthetic data set: generate it, shard it, train on it.
# Every step is resumable: rerunning skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
SHARDS=${SHARDS:-shards/synthetic}

[ -f "$DATA/candidates.csv" ] || python -m luna_dist.synth "$DATA" --cts "${CTS:-40}" --seed 0
python -m luna_dist.shard --data "$DATA" --out "$SHARDS"
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    launch/train.py --shards "$SHARDS" --epochs "${EPOCHS:-5}" --epoch-samples 2048 --balanced 1 --augment --run-name demo
echo "TensorBoard logs: runs/demo (tensorboard --logdir runs)"
