#!/usr/bin/env bash
# The seeded study (README "The seeded study", docs/results.md): every model of a study profile
# trained and swept by the `aot` steps (the commands of dvc.yaml), as single-threaded processes, as
# many at once as there are cores, then the guided arm and `aot study-report`.
#   scripts/study.sh [PROFILE] [OUT] [PAGE]   (defaults: configs/study-digits.yaml study docs/results.md)
# Why processes rather than `aot demo`'s lanes: the study's variants train with different seeds,
# which threads of one process cannot keep apart (aot_pipeline/lanes.py), and one torch thread per
# process is what makes the bits independent of the machine's core count (docs/benchmarks.md,
# "Lanes"). Measured here: two 1-thread processes train 1.7x as many img/s as one 2-thread process.
set -euo pipefail
cd "$(dirname "$0")/.."
export P=${1:-configs/study-digits.yaml} R=${2:-study} A=.venv/bin/aot
PAGE=${3:-docs/results.md}
JOBS=$(nproc)  # before the export below: GNU nproc honours OMP_NUM_THREADS
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export D=$R/data/dataset.npz REF=$R/data/reference G=$R/guidance
read -r guided variants < <(.venv/bin/python - "$P" <<'EOF'
import sys
from aot_pipeline.config import load_params
from aot_pipeline.study import check_arms, study_models
p = load_params(sys.argv[1])
check_arms(study_models(p, "."))  # an unfair comparison fails here, not after hours of training
print(p.guidance.variant if p.guided else "-", *p.variants)
EOF
)

model() {
  $A train --params "$P" --variant "$1" --data "$D" --run-dir "$R/runs/$1" --resume auto
  $A sweep --params "$P" --variant "$1" --run-dir "$R/runs/$1" --reference "$REF" --out "$R/sweeps/$1"
}
export -f model

$A prepare --params "$P" --out "$D" --downloads "$R/data/downloads"
$A reference --params "$P" --data "$D" --out "$REF" &
reference=$!
if [ "$guided" != "-" ]; then $A extractor --params "$P" --data "$D" --out "$G/extractor.pt"; fi
wait "$reference"
# shellcheck disable=SC2086
printf '%s\n' $variants | xargs -P "$JOBS" -I{} bash -c 'model "$1"' _ {}
if [ "$guided" != "-" ]; then
  run="$R/runs/$guided"
  $A fakes --params "$P" --run-dir "$run" --out "$G/fakes.npz"
  $A discriminator --params "$P" --run-dir "$run" --data "$D" --fakes "$G/fakes.npz" \
    --extractor "$G/extractor.pt" --reference "$REF" --out "$G/discriminator"
  $A guided-sweep --params "$P" --run-dir "$run" --name "$guided-dg" --extractor "$G/extractor.pt" \
    --discriminator "$G/discriminator" --reference "$REF" --out "$R/sweeps/$guided-dg"
fi
$A study-report --params "$P" --root "$R" --out "$PAGE"
