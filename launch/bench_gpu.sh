#!/usr/bin/env bash
# The benchmark suite at sizes for one CUDA GPU (a few minutes): shard build, loader scaling with
# up to 8 workers, training against the compute ceiling with bf16 and channels_last_3d, and the
# analysis: seconds per CT by stage, and the UNet's slices/s on whole slices against the body's box,
# NCHW against channels_last (the figure that decides luna_dist.common.hardware.seg_memory_format on a
# GPU), fp32 and bf16; then the loader on zstd shards of the same CTs. First the doctor (docs/doctor.md): the
# machine, every operation and both models against the CPU in fp32 (TF32) and bf16, each task's samples/s.
#   launch/bench_gpu.sh [OUT_DIR]      -> OUT_DIR/doctor.json, bench-gpu.json, bench-gpu.png, bench-gpu-loader-zstd.json,
#                                         tables on stdout
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# A failed check exits 1 naming it: its findings are in doctor.json, and the benchmarks still run.
python -m luna_dist.doctor --device cuda --mixed-precision bf16 --json "$OUT/doctor.json" || true
# bf16 autocast for the end-to-end runs (the Accelerator reads it); the ceiling variants cover the rest.
ACCELERATE_MIXED_PRECISION=bf16 python -m luna_dist.bench all --device cuda \
    --cts 20 --shape 200 512 512 --workers 8 --analyze-cts 4 --analyze-slices 128 \
    --loader-workers 0 1 2 4 8 --loader-samples 20000 --baseline-samples 300 \
    --batch-sizes 256 1024 --train-steps 60 --train-workers 6 --no-ranks \
    --variants default+no cl3d+no default+bf16 cl3d+bf16 \
    --work "$OUT/work" --json "$OUT/bench-gpu.json" --plot "$OUT/bench-gpu.png"
# The loader again on zstd shards of the same CTs: how many workers a GPU takes with each codec
# (the run above measures the default, lz4; `bench shard` above compares the codecs on one core).
python -m luna_dist.shard --data "$OUT/work/data" --out "$OUT/work/shards-zstd" --codec zstd --workers 8 --no-progress
python -m luna_dist.bench loader --data "$OUT/work/data" --shards "$OUT/work/shards-zstd" \
    --loader-workers 0 1 2 4 8 --loader-samples 20000 --baseline-samples 300 --batch-sizes 256 \
    --work "$OUT/work" --json "$OUT/bench-gpu-loader-zstd.json"
