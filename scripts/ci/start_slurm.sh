#!/usr/bin/env bash
# Bring up a single-node SLURM on this machine, for the tests that need a real one.
#
#   scripts/ci/start_slurm.sh            # then: source "${STREAMEM_SLURM_DIR:-/tmp/streamem-slurm}/env"
#   eval "$(scripts/ci/start_slurm.sh)"  # the same: stdout is only `export ...` lines
#
# Installs Debian's slurm-wlm, slurmctld, slurmd and munge when they are missing
# (apt-get, as root), writes a munge key and a slurm.conf under STREAMEM_SLURM_DIR
# (default /tmp/streamem-slurm), starts munged, slurmctld and slurmd with them and
# waits until the node is idle. Nothing under /etc is used: every daemon gets its
# files, sockets and ports (STREAMEM_SLURM_PORT, default 16817, and the next one)
# from that directory, so a site's own SLURM or munge is left alone.
# No cgroups: processes are tracked through /proc (proctrack/linuxproc), tasks
# are not bound (task/none); CPUs and memory are this machine's (`slurmd -C`).
# Idempotent: when its daemons are up already, it only prints the environment.
# scripts/ci/stop_slurm.sh stops exactly these daemons.
set -euo pipefail

DIR=${STREAMEM_SLURM_DIR:-/tmp/streamem-slurm}
PORT=${STREAMEM_SLURM_PORT:-16817}
CONF="$DIR/slurm.conf"
HERE=$(cd "$(dirname "$0")" && pwd)
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)

say() { echo "start_slurm.sh: $*" >&2; }
fail() { say "$*"; exit 1; }

alive() {  # alive PIDFILE NAME: the pid file names a running NAME process
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

print_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF" > "$DIR/env"
    cat "$DIR/env"
}

install_packages() {
    local missing=0 cmd
    for cmd in munged slurmctld slurmd sinfo sbatch squeue scancel; do
        command -v "$cmd" > /dev/null || missing=1
    done
    [ "$missing" = 0 ] && return 0
    [ "$(id -u)" = 0 ] || fail "SLURM is not installed and installing it needs root: apt-get install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} with apt-get"
    # The packages' scripts would start the system's daemons (with /etc's
    # config); a policy-rc.d that refuses keeps them stopped. Only one we made is removed.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local status=0
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" > "$DIR/apt.log" 2>&1; then
        # The package lists may be missing or old on a fresh machine.
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } \
            >> "$DIR/apt.log" 2>&1 || status=$?
    fi
    [ "$made_policy" = 1 ] && rm -f "$policy"
    if [ "$status" != 0 ]; then
        tail -n 5 "$DIR/apt.log" >&2
        fail "apt-get install ${PACKAGES[*]} failed (exit $status); the whole log is $DIR/apt.log"
    fi
}

write_config() {
    local host node
    host=$(hostname -s)
    # This machine as slurmd sees it: NodeName=<host> CPUs=... RealMemory=...
    node=$(slurmd -C | head -n 1)
    case "$node" in NodeName=*) ;; *) fail "slurmd -C did not describe this machine: $node" ;; esac
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
    chmod 700 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    cat > "$CONF" <<EOF
# Single-node SLURM for streamem's tests, written by scripts/ci/start_slurm.sh.
ClusterName=streamem
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munged.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups: track processes through /proc, do not bind tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# Cores and memory are consumable: several jobs share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
ReturnToService=2
# A cancelled job's processes get SIGKILL 5 s after SIGTERM (default 30).
KillWait=5
# Finished jobs leave the controller after 4 s, so that sbatch --wait polls every 2 s (else up to 32 s).
MinJobAge=4
${node/NodeName=$host/NodeName=$host NodeAddr=127.0.0.1} State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemons() {
    munged --socket="$DIR/munge/munged.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --force \
        || fail "munged did not start; see $DIR/log/munged.log"
    # -c: a fresh controller, without the jobs of an earlier run.
    slurmctld -c -f "$CONF" || fail "slurmctld did not start; see $DIR/log/slurmctld.log"
    slurmd -f "$CONF" || fail "slurmd did not start; see $DIR/log/slurmd.log"
}

wait_idle() {
    local state="" i
    for i in $(seq 1 150); do
        state=$(SLURM_CONF="$CONF" sinfo -h -N -o %T 2>/dev/null | head -n 1) || true
        [ "$state" = idle ] && return 0
        sleep 0.2
    done
    tail -n 5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    fail "the node is not idle after 30 s (sinfo says '${state:-nothing}'); logs under $DIR/log"
}

main() {
    mkdir -p "$DIR"
    chmod 755 "$DIR"
    if alive "$DIR/munge/munged.pid" munged && alive "$DIR/slurmctld.pid" slurmctld && alive "$DIR/slurmd.pid" slurmd \
        && [ "$(SLURM_CONF="$CONF" sinfo -h -N -o %T 2>/dev/null | head -n 1)" = idle ]; then
        print_env
        return 0
    fi
    # Half of an earlier start (one daemon died): stop what is left, start again.
    STREAMEM_SLURM_DIR="$DIR" bash "$HERE/stop_slurm.sh" > /dev/null
    local t0=$SECONDS
    install_packages
    local t1=$SECONDS
    write_config
    start_daemons
    wait_idle
    say "SLURM is up (install $((t1 - t0)) s, start $((SECONDS - t1)) s): SLURM_CONF=$CONF"
    print_env
}

main "$@"
