#!/usr/bin/env bash
# Several CPU processes on one machine (DistributedType.MULTI_CPU over gloo): for tests and for
# machines without an accelerator. `accelerate launch --cpu` starts a single process, so torchrun
# starts the ranks and accelerate picks them up from its environment.
#   launch/cpu_ranks.sh shards/NAME [train.py flags]         (NPROC=4 launch/cpu_ranks.sh ... for 4 ranks)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${1:?usage: launch/cpu_ranks.sh SHARD_DIR [train.py flags]}
shift
ACCELERATE_USE_CPU=true exec torchrun --nproc_per_node "${NPROC:-2}" launch/train.py --shards "$SHARDS" "$@"
