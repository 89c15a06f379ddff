#!/usr/bin/env bash
# LUNA16's 10-fold cross-validation in one command: one run per validation fold, each trained
# on the other folds, then the validation predictions of every fold merged into one file and
# scored over all series with luna_dist.evaluate (the CPM LUNA16 papers report).
#   launch/cv.sh SHARD_DIR [train.py flags]
# Environment: OUT (default runs/cv), FOLDS (default: every fold of the build that has series),
# LAUNCH (the launcher, default `python -m luna_dist.train`; e.g. "accelerate launch -m luna_dist.train").
# Relative SHARD_DIR and OUT are taken from the folder the script is started in.
# Resumable per fold: a fold finished with the same flags is skipped, an unfinished one resumes
# from its last saved epoch, and training refuses to resume a fold trained with other flags
# (naming them) rather than relabel it. Each fold's last epoch's predictions are the ones merged, and
# each fold's best.pt is its last epoch (--select-on last): no fold is scored by a model chosen on it.
set -euo pipefail
SHARDS=${1:?usage: launch/cv.sh SHARD_DIR [train.py flags]}
shift
OUT=${OUT:-runs/cv}
LAUNCH=${LAUNCH:-python -m luna_dist.train}
FOLDS=${FOLDS:-$(python -c "
import json, sys
folds = json.load(open(sys.argv[1] + '/manifest.json'))['folds']
print(' '.join(k for k in sorted(folds, key=int) if folds[k]['series']))" "$SHARDS")}
mkdir -p "$OUT"
started=$(date +%s)

for fold in $FOLDS; do
    run="$OUT/fold$fold"
    if [ -f "$run/cv-done" ] && [ "$(cat "$run/cv-done")" = "$*" ]; then
        echo "fold $fold: done, skipped"
        continue
    fi
    # A saved state (under any name a kill left it) is continued; a folder without one holds nothing to keep.
    resume=$(compgen -G "$run/state*" >/dev/null && echo --resume || { [ -d "$run" ] && echo --overwrite; } || true)
    echo "fold $fold: training on the other folds${resume:+ ($resume)}"
    # shellcheck disable=SC2086  # LAUNCH is a command line
    if ! $LAUNCH --shards "$SHARDS" --val-folds "$fold" --select-on last --out "$OUT" --run-name "fold$fold" \
            $resume "$@"; then
        echo "error: fold $fold failed (above); a fold resumes only with the flags it was trained with:" \
             "use another OUT for other flags, or remove $run to train it afresh" >&2
        exit 1
    fi
    printf '%s' "$*" > "$run/cv-done"
done

files=()
for fold in $FOLDS; do
    last=$(ls "$OUT/fold$fold"/val-predictions-E*.csv 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$last" ] || { echo "error: $OUT/fold$fold has no val-predictions-E*.csv; rerun to finish it" >&2; exit 1; }
    files+=("$last")
done
plot=$(python -c "import matplotlib" 2>/dev/null && echo "--plot $OUT/froc.png" || true)
# Every fold's marks scored as one and merged into one file; each file's sidecar (what its model saw) is checked.
# shellcheck disable=SC2086  # FOLDS and plot are lists of words
python -m luna_dist.evaluate --shards "$SHARDS" --folds $FOLDS --predictions "${files[@]}" \
    --merged "$OUT/predictions.csv" --json "$OUT/cv-score.json" $plot
echo "cross-validation of folds $FOLDS: $OUT/predictions.csv, $OUT/cv-score.json ($(( $(date +%s) - started )) s)"
