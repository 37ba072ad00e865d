#!/usr/bin/env bash
# Nightly job: fold new data into yesterday's model, keeping component labels.
#
#   MODE=refit  (default) DATA holds all rows: batch re-fit warm-started from the current model.
#   MODE=update           DATA holds only the rows that arrived since the last run: stepwise EM
#                         over them from the current model's online state (`streamem update`);
#                         it reads only the new rows. Set STEP_SIZE for a constant step
#                         (drifting data: old rows are forgotten at that rate).
#
# cron:   15 2 * * *  MODE=update /opt/streamem/scripts/nightly_refit.sh /data/new-rows.zarr /models
# SLURM:  sbatch --time=04:00:00 --cpus-per-task=8 scripts/nightly_refit.sh /data/today.zarr /models
#SBATCH --job-name=streamem-refit
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ] || [ -z "$1" ] || [ -z "$2" ]; then
    echo "usage: [MODE=refit|update] [STEP_SIZE=C] [N_COMPONENTS=K] nightly_refit.sh DATA.zarr MODEL_DIR [CONFIG.yaml]" >&2
    exit 2
fi
DATA=$1
MODELS=$2
CONFIG=${3:-}
MODE=${MODE:-refit}
STREAMEM=${STREAMEM:-streamem}
TODAY=$(date +%Y-%m-%d)
NEW="$MODELS/model-$TODAY.zarr"
CURRENT="$MODELS/current.zarr"    # symlink to the model in use
CKPT="$MODELS/ckpt-$TODAY"

case "$MODE" in
    refit|update) ;;
    *) echo "nightly_refit.sh: MODE must be refit or update, got '$MODE'" >&2; exit 2 ;;
esac

if [ -e "$CURRENT" ] && [ "$MODE" = update ]; then
    args=(update "$CURRENT" "$DATA" --out "$NEW" --overwrite --checkpoint "$CKPT" --resume --quiet)
    [ -n "${STEP_SIZE:-}" ] && args+=(--step-size "$STEP_SIZE")
elif [ -e "$CURRENT" ]; then
    args=(fit "$DATA" --out "$NEW" --overwrite --checkpoint "$CKPT" --resume --quiet --init-from "$CURRENT")
else
    # The first run fits from scratch (stepwise in update mode: it keeps an online state either way).
    args=(fit "$DATA" --out "$NEW" --overwrite --checkpoint "$CKPT" --resume --quiet
          --n-components "${N_COMPONENTS:-8}" --random-state 0)
    [ "$MODE" = update ] && args+=(--algorithm stepwise)
fi
[ -n "$CONFIG" ] && args+=(--config "$CONFIG")

# A failed run leaves current.zarr untouched (exit status 2: bad input, 1: unexpected).
"$STREAMEM" "${args[@]}"
ln -sfn "$(basename "$NEW")" "$CURRENT.tmp" && mv -T "$CURRENT.tmp" "$CURRENT"
rm -rf "$CKPT"
"$STREAMEM" info "$CURRENT"
