#!/usr/bin/env bash
# A throw-away Slurm cluster of N nodes on this machine, on emulated hosts (scripts/hosts.sh): one
# slurmd per host, in that host's namespaces, and slurmctld on a host of its own on the same bridge.
# For the multi-node Slurm tests (tests/slurm/test_nodes*.py) and for trying the multi-node batch
# scripts by hand. Root; Debian's slurm packages (installed by cluster.sh install); no accounting.
#
#   scripts/slurm/lab.sh start DIR [N] [--owner PID]  # lab with hosts ctld, node1..nodeN (N=2); wait idle
#   DIR/bin/sbatch ... (squeue, scancel, scontrol, sinfo, srun) # the s* commands, run on host ctld
#   source DIR/env.sh                                 # or: those first on the PATH (and SLURM_CONF, the lab)
#   scripts/slurm/lab.sh status DIR                   # sinfo + squeue
#   scripts/slurm/lab.sh stop DIR                     # cancel every job, then take the hosts down
#
# The machine's 127.0.0.1 is not the hosts' loopback, and the machine has no route into the lab: the
# s* commands reach the controller by running inside host ctld (DIR/bin/<cmd> = hosts.sh exec ctld
# <cmd>). A job inherits the submitter's environment, DIR/bin on the PATH included: inside a lab host
# the wrappers run the real command where they are (srun and scontrol in a batch script must run on
# the job's own node). munge is shared: one munged (on ctld) whose socket, a file, every host sees.
# Each host's data cache ($HARNESS_CACHE or ~/.cache/harness, or --cache) is node-local: hosts.sh binds
# DIR/local/<host> over it; everything else, run directories included, is shared.
#
# A lost node is noticed in seconds: SlurmdTimeout=5 (the controller pings every SlurmdTimeout/3 and
# sets a node DOWN once it has not answered for 5 s), MessageTimeout=5 and TCPTimeout=2 (an
# unreachable node costs a ping 2 s, not 10), KillWait=5. A node set DOWN stays down until its slurmd
# registers again (ReturnToService=2), so a requeued --nodes=1-2 job runs on the nodes that remain.
# Per node: SlurmdSpoolDir DIR/state/d/<node>, SlurmdPidFile DIR/run/slurmd-<node>.pid, SlurmdLogFile
# DIR/log/slurmd-<node>.log. The single-node cluster (cluster.sh, .slurm/) is independent of this one:
# other directory, other munged, and the lab's ports live in the lab's own network namespaces.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOSTS=$HERE/../hosts.sh
CMD=${1:-}
D=${2:-}
PORT_CTLD=6817
PORT_D=6818

log() { echo "[lab.sh $(date +%T)] $*" >&2; }
die() { echo "lab.sh: $*" >&2; exit 1; }
usage() { sed -n '7,11p' "$HERE/lab.sh" | sed 's/^# \{0,1\}//' >&2; exit 2; }

names() {  # DIR -> LAB (hosts.sh lab name) and SOCK (munged's socket), both derived from DIR
    local h
    h=$(printf '%s' "$D" | sha256sum | cut -c1-10)
    LAB=slurm-$h
    SOCK_DIR=/tmp/harness-munge-$h  # munged wants every directory above its socket searchable by all
    SOCK=$SOCK_DIR/munge.socket.2
}

on() {  # host command...: run on a lab host
    bash "$HOSTS" -n "$LAB" exec "$@"
}

write_wrappers() {
    local cmd me
    me=$(readlink /proc/self/ns/net)
    mkdir -p "$D/bin"
    for cmd in sbatch squeue scancel scontrol sinfo srun sacct; do
        cat > "$D/bin/$cmd" <<SH
#!/usr/bin/env bash
# written by scripts/slurm/lab.sh: $cmd against the lab cluster under $D
export SLURM_CONF=$D/etc/slurm.conf
# already on a lab host (a batch script that inherited this PATH): the real command, right here
[ "\$(readlink /proc/self/ns/net)" = "$me" ] || exec /usr/bin/$cmd "\$@"
exec bash $HOSTS -n $LAB exec ctld /usr/bin/$cmd "\$@"
SH
        chmod +x "$D/bin/$cmd"
    done
    # HARNESS_HOSTS_LAB: hosts.sh's default lab, so `scripts/hosts.sh cut node2` needs no -n
    # shellcheck disable=SC2016  # $PATH is the sourcing shell's
    printf 'export SLURM_CONF=%s\nexport PATH=%s:$PATH\nexport HARNESS_HOSTS_LAB=%s\n' \
        "$D/etc/slurm.conf" "$D/bin" "$LAB" > "$D/env.sh"
}

write_conf() {  # N
    local n=$1 i mem
    mem=$(( $(free -m | awk '/^Mem:/{print $2}') / (2 * n) ))  # RealMemory is not enforced here
    {
        cat <<CONF
# written by scripts/slurm/lab.sh: $n nodes on emulated hosts, root only, no cgroups, no accounting
ClusterName=harness-lab
SlurmctldHost=ctld($(bash "$HOSTS" -n "$LAB" addr ctld))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=10
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_D
StateSaveLocation=$D/state/ctld
SlurmdSpoolDir=$D/state/d/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
$("$HERE/cluster.sh" plugins-conf "$D")
# a lost node in seconds (see the header); a DOWN node returns only when its slurmd registers again
SlurmdTimeout=5
MessageTimeout=5
TCPTimeout=2
KillWait=5
ReturnToService=2
InactiveLimit=0
Waittime=0
MinJobAge=${SLURM_MIN_JOB_AGE:-4}
# 4 CPUs a node on a 2-core machine: two 2-rank jobs side by side (an array, a reference run)
SlurmdParameters=config_overrides
CONF
        for i in $(seq 1 "$n"); do
            echo "NodeName=node$i NodeHostname=node$i NodeAddr=$(bash "$HOSTS" -n "$LAB" addr "node$i")" \
                 "CPUs=${SLURM_FAKE_CPUS:-4} Boards=1 SocketsPerBoard=1 CoresPerSocket=${SLURM_FAKE_CPUS:-4}" \
                 "ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$D/etc/slurm.conf"
    # a host's fresh /sys has nothing at /sys/fs/cgroup, where slurmd's default (autodetect) looks and
    # gives up; nothing here uses cgroups (proctrack/linuxproc, task/none), so name the plugin outright
    echo "CgroupPlugin=cgroup/v1" > "$D/etc/cgroup.conf"
}

wait_idle() {  # N: every node idle, or fail with the logs
    local n=$1 idle=0
    for _ in $(seq 1 120); do
        idle=$("$D/bin/sinfo" -h -N -o '%N %T' 2>/dev/null | awk '$2 == "idle"' | wc -l) || idle=0
        [ "$idle" -eq "$n" ] && return 0
        sleep 0.5
    done
    log "$idle of $n nodes idle after 60 s; last log lines:"
    tail -n 20 "$D/log/"*.log >&2
    return 1
}

start() {
    local n=2 owner=() i
    while [ $# -gt 0 ]; do
        case $1 in
            --owner) owner=(--owner "${2:?--owner PID}"); shift 2 ;;
            [0-9]*) n=$1; shift ;;
            *) usage ;;
        esac
    done
    if [ "$n" -lt 1 ] || [ "$n" -gt 64 ]; then die "start DIR $n: N nodes, between 1 and 64"; fi
    "$HERE/cluster.sh" install
    mkdir -p "$D"/{etc,log,run,state/ctld,munge,local}
    for i in $(seq 1 "$n"); do mkdir -p "$D/state/d/node$i"; done
    # shellcheck disable=SC2046
    bash "$HOSTS" -n "$LAB" up ctld $(for i in $(seq 1 "$n"); do echo "node$i"; done) \
        --local "$D/local" "${owner[@]}" >/dev/null
    trap 'log "start failed; taking the lab down"; stop' EXIT
    write_wrappers
    write_conf "$n"
    mkdir -p "$SOCK_DIR"
    chmod 0755 "$D/munge" "$SOCK_DIR"
    mungekey --create --keyfile="$D/munge/munge.key" --bits=1024 --force
    chmod 0600 "$D/munge/munge.key"
    on ctld munged --socket="$SOCK" --key-file="$D/munge/munge.key" --pid-file="$D/munge/munged.pid" \
        --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed" --force
    export SLURM_CONF=$D/etc/slurm.conf
    on ctld slurmctld -c
    for i in $(seq 1 "$n"); do on "node$i" slurmd -N "node$i"; done
    wait_idle "$n"
    trap - EXIT
    log "cluster up: $n nodes idle (lab $LAB; controller on ctld $(bash "$HOSTS" -n "$LAB" addr ctld))"
    echo "source $D/env.sh"
}

stop() {
    if [ -x "$D/bin/scancel" ] && bash "$HOSTS" list | grep -q "^$LAB "; then
        "$D/bin/scancel" --user=root 2>/dev/null || true
        for _ in $(seq 1 20); do [ -z "$("$D/bin/squeue" -h 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    # every process on the hosts (munged, the daemons, job steps, tasks) ends with them
    bash "$HOSTS" -n "$LAB" down || true
    rm -rf "$SOCK_DIR"
}

[ -n "$D" ] || usage
mkdir -p "$D"
D=$(cd "$D" && pwd)
names
shift 2
case "$CMD" in
    start) start "$@" ;;
    stop) stop ;;
    status) "$D/bin/sinfo" -N && "$D/bin/squeue" ;;
    *) usage ;;
esac
