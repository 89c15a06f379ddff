#!/usr/bin/env bash
# The real LUNA16 at full scale, rehearsed on this machine (docs/luna16.md, "The rehearsal"):
# the stand-in download of the 888 real series (luna_dist.rehearsal) at two sizes, SIZES series
# (default 444 and 888), and per size every stage with its time, the peak memory of its largest
# process and its bytes on disk:
#   plan      --plan of the whole candidate table (551,065 rows at 888 series)
#   build     the shard build of folds 0 and 9 (all of their candidates): the whole table's
#             shards (~83 GB) do not fit on most disks, so two folds of ten are built and the
#             fraction is said
#   train     one epoch of EPOCH_SAMPLES balanced samples on fold 0, validation on all of fold 9
#             with LUNA16's CPM from the manifest's real findings (the epoch kept: chosen on no
#             fold, so fold 9 is then scored with it)
#   evaluate  LUNA16's scoring of the validation's predictions, and of a submission of every
#             candidate of the 888 (or 444) series with a random probability
#   analyze   the analysis of fold 9 in candidates mode (its candidates scored by the classifier)
#   seg-build, seg-train, analyze-seg   the same for the UNet: its shards of folds 0 and 9, one
#             epoch, and the analysis of fold 9 end to end (CT -> UNet -> groups -> classifier)
# Then tables the figures and their growth from one size to the other: $WORK/rehearsal.md.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/luna_dist-rehearsal}
TABLES=${TABLES:-../shared/luna16-tables}
SIZES=${SIZES:-444 888}
EPOCH_SAMPLES=${EPOCH_SAMPLES:-2048}
WORKERS=${WORKERS:-$(python -c "import os; print(os.cpu_count())")}
mkdir -p "$WORK"
FIGURES="$WORK/figures.jsonl"
: > "$FIGURES"

# stage SIZE NAME PATH-MEASURED COMMAND...: run it under /usr/bin/time, append its figures.
stage() {
    local size=$1 name=$2 measured=$3
    shift 3
    echo "== $size series: $name: $*" >&2
    /usr/bin/time -f "%e %M" -o "$WORK/time.txt" "$@" > "$WORK/$size-$name.log" 2>&1 \
        || { echo "error: $name failed, see $WORK/$size-$name.log" >&2; tail -5 "$WORK/$size-$name.log" >&2; exit 1; }
    read -r seconds peak_kb < <(tail -1 "$WORK/time.txt")
    local bytes=0
    [ -e "$measured" ] && bytes=$(du -sb "$measured" | cut -f1)
    echo "{\"size\": $size, \"stage\": \"$name\", \"seconds\": $seconds, \"peak_kb\": $peak_kb, \"bytes\": $bytes}" >> "$FIGURES"
}

for size in $SIZES; do
    data="$WORK/data-$size"
    shards="$WORK/shards-$size"
    rm -rf "$data" "$shards" "$WORK/runs-$size" "$WORK/results-$size"
    stage "$size" generate "$data" python -m luna_dist.rehearsal "$data" --tables "$TABLES" --series "$size" \
        --workers "$WORKERS"
    stage "$size" plan "$data" python -m luna_dist.shard --data "$data" --out "$shards" --plan --workers "$WORKERS"
    # Folds 0 and 9 (subset0/, subset9/): their rows of the candidate table, at full density.
    python - "$data" <<'EOF'
import sys
from pathlib import Path
data = Path(sys.argv[1])
kept = {mhd.stem for folder in ("subset0", "subset9") for mhd in (data / folder).glob("*.mhd")}
lines = (data / "candidates.csv").read_text().splitlines(keepends=True)
(data.parent / f"{data.name}-folds-0-9.csv").write_text(
    lines[0] + "".join(line for line in lines[1:] if line.split(",", 1)[0] in kept))
EOF
    stage "$size" build "$shards" python -m luna_dist.shard --data "$data" --out "$shards" --workers "$WORKERS" \
        --candidates "$WORK/data-$size-folds-0-9.csv" --no-progress
    stage "$size" train "$WORK/runs-$size" python launch/train.py --shards "$shards" --val-folds 9 --select-on last \
        --epochs 1 --epoch-samples "$EPOCH_SAMPLES" --balanced 1 --batch-size 64 --out "$WORK/runs-$size" --run-name cls
    stage "$size" evaluate "$WORK/runs-$size/cls" python -m luna_dist.evaluate --shards "$shards" --folds 9 \
        --predictions "$WORK/runs-$size/cls/val-predictions-E1.csv" --json "$WORK/$size-evaluate.json"
    python - "$data" "$WORK/marks-$size.csv" <<'EOF'
import sys
import numpy as np
from pathlib import Path
lines = (Path(sys.argv[1]) / "candidates.csv").read_text().splitlines()[1:]
rng = np.random.default_rng(0)
with open(sys.argv[2], "w") as out:
    out.write("seriesuid,coordX,coordY,coordZ,probability\n")
    out.writelines(f"{line.rsplit(',', 1)[0]},{p:.6f}\n" for line, p in zip(lines, rng.random(len(lines))))
EOF
    kit="$data/evaluationScript/annotations"
    stage "$size" evaluate-all "$WORK/marks-$size.csv" python -m luna_dist.evaluate --annotations "$data/annotations.csv" \
        --excluded "$kit/annotations_excluded.csv" --seriesuids "$kit/seriesuids.csv" \
        --predictions "$WORK/marks-$size.csv" --json "$WORK/$size-evaluate-all.json"
    stage "$size" analyze "$WORK/results-$size" python -m luna_dist.analyze --data "$data" --shards "$shards" \
        --folds 9 --candidates "$WORK/data-$size-folds-0-9.csv" --cls-model "$WORK/runs-$size/cls/best.pt" \
        --out "$WORK/results-$size" --batch-size 64
    # The UNet's path at full scale: its shards of folds 0 and 9, one short epoch, and the analysis
    # CT -> UNet -> groups -> nodule probabilities of fold 9 with it.
    stage "$size" seg-build "$WORK/seg-$size" python -m luna_dist.shard --task seg --data "$data" \
        --out "$WORK/seg-$size" --workers "$WORKERS" --candidates "$WORK/data-$size-folds-0-9.csv" --no-progress
    stage "$size" seg-train "$WORK/runs-$size/seg" python launch/train.py --task seg --shards "$WORK/seg-$size" \
        --val-folds 9 --select-on last --epochs 1 --epoch-samples "$EPOCH_SAMPLES" --batch-size 16 --augment \
        --out "$WORK/runs-$size" --run-name seg
    stage "$size" analyze-seg "$WORK/results-seg-$size" python -m luna_dist.analyze --data "$data" \
        --shards "$shards" --folds 9 --seg-model "$WORK/runs-$size/seg/best.pt" \
        --cls-model "$WORK/runs-$size/cls/best.pt" --out "$WORK/results-seg-$size" --batch-size 64
    rm -rf "$shards" "$WORK/seg-$size"  # the next size needs the disk
done
python - "$FIGURES" "$WORK" > "$WORK/rehearsal.md" <<'EOF'
import json
import math
import platform
import sys
from pathlib import Path

from luna_dist import __version__
from luna_dist.common.hardware import cpu_features

rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]
sizes = sorted({row["size"] for row in rows})
by = {(row["size"], row["stage"]): row for row in rows}
print(f"luna_dist {__version__}, {platform.processor() or platform.machine()}, {cpu_features()}\n")
print("| stage | " + " | ".join(f"{s} series: s, peak MB, bytes" for s in sizes) + " | growth (time, memory, bytes) |")
print("|---|" + "---|" * (len(sizes) + 1))
for stage in dict.fromkeys(row["stage"] for row in rows):
    cells = []
    for size in sizes:
        row = by.get((size, stage))
        cells.append("" if row is None else f"{row['seconds']:.1f}, {row['peak_kb'] / 1024:.0f}, {row['bytes']:,}")
    growth = ""
    if len(sizes) >= 2 and all((s, stage) in by for s in sizes[:2]):
        small, large = by[(sizes[0], stage)], by[(sizes[-1], stage)]
        power = lambda a, b: math.log(b / a) / math.log(sizes[-1] / sizes[0]) if a > 0 and b > 0 else float("nan")
        growth = ", ".join(f"{power(small[k], large[k]):.2f}" for k in ("seconds", "peak_kb", "bytes"))
    print(f"| {stage} | " + " | ".join(cells) + f" | {growth} |")
print("\ngrowth: the power p in cost ~ size^p between the two sizes (1 = linear in the data, 2 = quadratic)")
for size in sizes:
    work = Path(sys.argv[2])
    for name in ("evaluate", "evaluate-all"):
        path = work / f"{size}-{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            print(f"{size} series, {name}: CPM {result.get('cpm')}, {result.get('scans')} scans, "
                  f"{result.get('marks')} marks")
EOF
cat "$WORK/rehearsal.md"
