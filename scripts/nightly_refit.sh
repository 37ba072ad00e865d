#!/usr/bin/env bash
# Nightly re-fit: start from yesterday's model so that component k keeps its meaning.
# cron:   15 2 * * *  /opt/streamem/scripts/nightly_refit.sh /data/today.zarr /models
# SLURM:  sbatch --time=04:00:00 --cpus-per-task=8 scripts/nightly_refit.sh /data/today.zarr /models
#SBATCH --job-name=streamem-refit
set -euo pipefail

DATA=${1:?usage: nightly_refit.sh DATA.zarr MODEL_DIR [CONFIG.yaml]}
MODELS=${2:?usage: nightly_refit.sh DATA.zarr MODEL_DIR [CONFIG.yaml]}
CONFIG=${3:-}
STREAMEM=${STREAMEM:-streamem}
TODAY=$(date +%Y-%m-%d)
NEW="$MODELS/model-$TODAY.zarr"
CURRENT="$MODELS/current.zarr"    # symlink to the model in use

args=(fit "$DATA" --out "$NEW" --overwrite --checkpoint "$MODELS/ckpt-$TODAY" --resume --quiet)
[ -n "$CONFIG" ] && args+=(--config "$CONFIG")
if [ -e "$CURRENT" ]; then
    args+=(--init-from "$CURRENT")     # warm start + keep component labels
else
    args+=(--n-components "${N_COMPONENTS:-8}" --random-state 0)
fi

# A failed fit leaves current.zarr untouched (exit status 2: bad input, 1: unexpected).
"$STREAMEM" "${args[@]}"
ln -sfn "$(basename "$NEW")" "$CURRENT.tmp" && mv -T "$CURRENT.tmp" "$CURRENT"
rm -rf "$MODELS/ckpt-$TODAY"
"$STREAMEM" info "$CURRENT"
