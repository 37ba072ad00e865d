#!/usr/bin/env bash
# Stop the single-node SLURM of scripts/ci/start_slurm.sh: its jobs, then the
# slurmd, slurmctld and munged named by the pid files under STREAMEM_SLURM_DIR
# (default /tmp/streamem-slurm). Nothing else: a pid file whose process is gone
# or is another program (a reused pid) is only removed, and so is the env file
# start_slurm.sh wrote. Safe to run twice.
set -uo pipefail

DIR=${STREAMEM_SLURM_DIR:-/tmp/streamem-slurm}
CONF="$DIR/slurm.conf"

say() { echo "stop_slurm.sh: $*" >&2; }

pid_of() {  # pid_of PIDFILE NAME: the pid, when it is a running NAME process
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}

stop() {  # stop PIDFILE:NAME...: SIGTERM to each at once (each takes a second or two), SIGKILL after 10 s
    local item pid pids=() i
    for item in "$@"; do
        pid=$(pid_of "${item%%:*}" "${item##*:}") && kill -TERM "$pid" 2> /dev/null && pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        for i in $(seq 1 100); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
        if [ -d "/proc/$pid" ]; then
            say "$(cat "/proc/$pid/comm" 2> /dev/null) ($pid) did not stop within 10 s: SIGKILL"
            kill -KILL "$pid" 2> /dev/null
        fi
    done
    for item in "$@"; do
        rm -f "${item%%:*}"
    done
}

# The jobs first, while the controller can still end them: a job's processes
# run under slurmstepd, which outlives slurmd.
if [ -f "$CONF" ] && pid_of "$DIR/slurmctld.pid" slurmctld > /dev/null && command -v scancel > /dev/null; then
    export SLURM_CONF="$CONF"
    if [ -n "$(squeue -h -o %i 2> /dev/null)" ]; then
        scancel --quiet $(squeue -h -o %i) 2> /dev/null
        for i in $(seq 1 100); do
            [ -z "$(squeue -h -o %i 2> /dev/null)" ] && break
            sleep 0.1
        done
    fi
fi
stop "$DIR/slurmd.pid:slurmd" "$DIR/slurmctld.pid:slurmctld" "$DIR/munge/munged.pid:munged"
rm -f "$DIR/env"  # the tests find no SLURM through it any more
exit 0
