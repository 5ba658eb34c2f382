#!/usr/bin/env bash
# A throw-away single-node Slurm cluster (munged + slurmctld + slurmd) under one directory, for the
# tests marked `slurm` and for trying the batch scripts. Root, no systemd, no cgroups, no accounting.
#
#   scripts/slurm/cluster.sh start [DIR]    # install (Debian packages) if needed, start, wait for idle
#   source DIR/env.sh                       # exports SLURM_CONF: every s* command needs it
#   scripts/slurm/cluster.sh status [DIR]   # sinfo + squeue; exit 1 when the controller does not answer
#   scripts/slurm/cluster.sh stop [DIR]     # cancel every job, then stop the daemons by their PIDs
#   scripts/slurm/cluster.sh install        # only install the packages (scripts/slurm/lab.sh uses it)
#   scripts/slurm/cluster.sh plugins-conf DIR   # the slurm.conf lines lab.sh shares (plugins, scheduler)
#
# DIR defaults to .slurm/ at the top of the repository (git ignores it). `make slurm-up`, `make
# slurm-down` and `make test-slurm` wrap this script. Environment:
#   SLURM_FAKE_CPUS=N   advertise N CPUs (more concurrent steps on a 2-core machine)
#   SLURM_CTLD_PORT / SLURM_D_PORT   controller / node daemon ports (default 6817 / 6818)
#   SLURM_SKIP_INSTALL=1             never apt-get install
#   SLURM_MIN_JOB_AGE=S              seconds a finished job stays in squeue (default 4, see below)
#
# Pitfalls this config already pays for (details: README "Slurm"):
#   - munge's socket directory must be 0755 and its key 0600, or munged refuses to start; munged also
#     wants every directory above the socket searchable by all, which a checkout under a 0700
#     folder (mktemp -d) is not: the socket lives in /tmp/harness-munge-<hash of DIR>/ instead;
#   - cred_expire=10: a requeued job waits cred_expire + 1 s before it can start again (default 120 s);
#   - MinJobAge<=4 keeps `sbatch --wait` polling every 2 s (else 2, 8, 32, 32 s...), so finished jobs
#     leave squeue within seconds: read outcomes from files (job output, log/jobcomp.log);
#   - killing slurmd leaves running job steps alive: `stop` cancels the jobs first;
#   - slurmctld starts cold (-c): a fresh cluster never resurrects the jobs of an earlier one.
set -euo pipefail

CMD=${1:-}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
D=${2:-$REPO/.slurm}
CTLD_PORT=${SLURM_CTLD_PORT:-6817}
D_PORT=${SLURM_D_PORT:-6818}

# munged's socket: outside DIR (see the pitfalls above), named after DIR's absolute path
sock_paths() { SOCK_DIR=/tmp/harness-munge-$(printf '%s' "$D" | sha256sum | cut -c1-12); SOCK=$SOCK_DIR/munge.socket.2; }

log() { echo "[cluster.sh $(date +%T)] $*" >&2; }
usage() { echo "usage: $0 start|stop|status [DIR] | install   (DIR default: $REPO/.slurm)" >&2; exit 2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    if { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null 2>&1; then
        return
    fi
    if [ -n "${SLURM_SKIP_INSTALL:-}" ]; then
        log "slurmctld/slurmd/sbatch/munged missing and SLURM_SKIP_INSTALL is set"; exit 1
    fi
    log "installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # the image's policy-rc.d blocks the packages' own service starts: we start the daemons ourselves
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    local sock=$SOCK
    mkdir -p "$SOCK_DIR"
    chmod 0755 "$D/munge" "$SOCK_DIR"
    [ -s "$D/munge/munge.key" ] || mungekey --create --keyfile="$D/munge/munge.key" --bits=1024
    chmod 0600 "$D/munge/munge.key"
    if alive "$D/munge/munged.pid"; then
        log "munged already running (pid $(cat "$D/munge/munged.pid"))"
    else
        rm -f "$sock" "$sock.lock"
        munged --socket="$sock" --key-file="$D/munge/munge.key" --pid-file="$D/munge/munged.pid" \
               --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed"
    fi
    munge --socket="$sock" -n | unmunge --socket="$sock" >/dev/null
}

plugins_conf() {  # DIR: the plugins and scheduling lines that this cluster and lab.sh's share
    cat <<CONF
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$1/log/jobcomp.log
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
CONF
}

write_conf() {
    local host=$1 node mem_total mem extra=""
    # the real topology from `slurmd -C` avoids "Node reconfigured socket/core boundaries"
    node=$(slurmd -C | head -1)
    mem_total=$(free -m | awk '/^Mem:/{print $2}')
    mem=$(( mem_total - mem_total / 10 ))
    node=$(echo "$node" | sed -E "s/RealMemory=[0-9]+/RealMemory=$mem/")
    if [ -n "${SLURM_FAKE_CPUS:-}" ]; then
        node="NodeName=$host CPUs=$SLURM_FAKE_CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$SLURM_FAKE_CPUS ThreadsPerCore=1 RealMemory=$mem"
        extra="SlurmdParameters=config_overrides"
    fi
    cat > "$D/etc/slurm.conf" <<CONF
# written by scripts/slurm/cluster.sh: one node, root only, no cgroups, no systemd, no accounting
ClusterName=harness-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=10
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
StateSaveLocation=$D/state/ctld
SlurmdSpoolDir=$D/state/d/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
$(plugins_conf "$D")
ReturnToService=2
KillWait=5
InactiveLimit=0
Waittime=0
MinJobAge=${SLURM_MIN_JOB_AGE:-4}
$extra
$node State=UNKNOWN NodeAddr=127.0.0.1
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    echo "export SLURM_CONF=$D/etc/slurm.conf" > "$D/env.sh"
}

start() {
    install_packages
    local host st=""
    host=$(hostname -s)
    mkdir -p "$D/etc" "$D/log" "$D/run" "$D/state/ctld" "$D/state/d/$host" "$D/munge"
    start_munge
    write_conf "$host"
    export SLURM_CONF=$D/etc/slurm.conf
    if alive "$D/run/slurmctld.pid"; then log "slurmctld already running"; else slurmctld -c; fi
    if alive "$D/run/slurmd.pid"; then log "slurmd already running"; else slurmd; fi
    for _ in $(seq 1 120); do
        st=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
        [ "$st" = idle ] && break
        sleep 0.5
    done
    if [ "$st" != idle ]; then
        log "node $host did not become idle (state '$st'); last log lines:"
        tail -n 20 "$D/log/"*.log >&2
        exit 1
    fi
    log "cluster up: node $host idle ($(sinfo -h -o %c) CPUs)"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {  # name pidfile
    local pid
    [ -f "$2" ] || return 0
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        log "stopped $1 ($pid)"
    fi
    rm -f "$2"
}

stop() {
    if [ -f "$D/etc/slurm.conf" ] && alive "$D/run/slurmctld.pid"; then
        export SLURM_CONF=$D/etc/slurm.conf
        scancel --user=root 2>/dev/null || true
        for _ in $(seq 1 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    stop_pid slurmd "$D/run/slurmd.pid"
    stop_pid slurmctld "$D/run/slurmctld.pid"
    stop_pid munged "$D/munge/munged.pid"
}

status() {
    [ -f "$D/etc/slurm.conf" ] || { log "no cluster under $D"; exit 1; }
    export SLURM_CONF=$D/etc/slurm.conf
    sinfo && squeue
}

case "$CMD" in
    start) mkdir -p "$D"; D=$(cd "$D" && pwd); sock_paths; start ;;
    stop) if [ -d "$D" ]; then D=$(cd "$D" && pwd); sock_paths; stop; rm -rf "$SOCK_DIR"; fi ;;
    status) status ;;
    install) install_packages ;;
    plugins-conf) plugins_conf "$D" ;;  # for scripts/slurm/lab.sh
    *) usage ;;
esac
