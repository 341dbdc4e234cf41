#!/bin/bash
# Data of the CPU schedule study (issue 17; README "Which training noise? The CPU schedule study"):
#   bash tools/bench/schedule_study/prepare_cpu.sh DIR      # ~3 CPU-minutes
#   latentdiff-schedule-study DIR/grid_cpu.yaml --out DIR/out        # re-run to resume; ~85 CPU-minutes
# DIR/data/px16, px32: 840 random crops of the 14 bundled photos (60 each, seed 0, tools/quickstart.py's
# write_photo_dataset) in pixel space with a 20% validation split; DIR/data/latent32: the same crops at 32 px
# through a small f4 autoencoder trained here (latentdiff-train-autoencoder --preset f4, 600 steps, 32 px crops).
set -euo pipefail
DIR=${1:?usage: prepare_cpu.sh DIR}
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
D=$DIR/data
mkdir -p "$D"
cp "$REPO/tools/bench/schedule_study/grid_cpu.yaml" "$DIR/grid_cpu.yaml"
cd "$REPO"
[ -d "$D/images" ] || "$PY" -c "
import sys; from pathlib import Path; sys.path.insert(0, 'tools')
from quickstart import write_photo_dataset
print(write_photo_dataset(Path(sys.argv[1]), 60, 0), 'crops')" "$D/images"
for r in 16 32; do
  [ -f "$D/px$r/val/stats.json" ] || "$PY" tools/encode_latents.py --input "$D/images" --output "$D/px$r" --resolution $r \
      --vae none --shard-size 64 --batch-size 32 --workers 1 --flip --val-fraction 0.2 --no-progress
done
[ -f "$DIR/ae/vae/config.json" ] || "$PY" -m latentdiff.cli.train_autoencoder --output "$DIR/ae" --preset f4 --steps 600 \
    --crop 32 --batch-size 8 --eval-every 0 --checkpoint-every 100 --precision fp32 --progress false
[ -f "$D/latent32/val/stats.json" ] || "$PY" tools/encode_latents.py --input "$D/images" --output "$D/latent32" --resolution 32 \
    --vae "$DIR/ae/vae" --shard-size 64 --batch-size 32 --workers 1 --flip --val-fraction 0.2 --no-progress
echo "prepared $DIR; run: latentdiff-schedule-study $DIR/grid_cpu.yaml --out $DIR/out"
