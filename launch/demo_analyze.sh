#!/usr/bin/env bash
# The rest of the roadmap on the synthetic data, after launch/demo.sh and launch/demo_seg.sh:
# fine-tune the malignancy model from the demo's nodule classifier, then analyse the CTs of
# the validation fold end to end (UNet on every slice -> groups -> nodule and malignancy
# probabilities) and score the findings. Rerunning skips finished work. The three models trained
# without fold 9 and kept their last epoch (--select-on last): none was chosen on the fold scored.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
SHARDS=${SHARDS:-shards/synthetic}
SEG_MODEL=${SEG_MODEL:-runs/seg-demo/best.pt}
CLS_MODEL=${CLS_MODEL:-runs/demo/best.pt}
for model in "$CLS_MODEL" "$SEG_MODEL"; do
    if [ ! -f "$model" ]; then
        echo "error: $model not found: run launch/demo.sh and launch/demo_seg.sh first" >&2
        exit 1
    fi
done
# As in demo.sh: on a machine without an accelerator the CPU does the work, with every core.
THREADS=$(python -c "import os; print(os.cpu_count())")
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
        --num_cpu_threads_per_process "$THREADS")
RESUME=$(compgen -G "runs/mal-demo/state*" >/dev/null && echo --resume || { [ -d runs/mal-demo ] && echo --overwrite; } || true)
"${LAUNCH[@]}" launch/train.py --task malignancy --shards "$SHARDS" --finetune "$CLS_MODEL" --finetune-depth 2 \
    --mix 1 1 0 --val-folds 9 --select-on last --run-name mal-demo $RESUME --epochs "${MAL_EPOCHS:-10}" --augment
"${LAUNCH[@]}" -m luna_dist.analyze --data "$DATA" --seg-model "$SEG_MODEL" --cls-model "$CLS_MODEL" \
    --mal-model runs/mal-demo/best.pt --folds 9 --out results/demo
echo "findings: results/demo/detections.csv, results/demo/summary.json"
