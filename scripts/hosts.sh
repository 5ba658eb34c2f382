#!/usr/bin/env bash
# Emulated hosts on one machine: real sockets between distinct hosts, for multi-node runs (the tests
# marked `multinode`, and by hand). Root (CAP_SYS_ADMIN, CAP_NET_ADMIN); iproute2 and util-linux.
#
#   scripts/hosts.sh [-n LAB] up N | HOST...  [--cache PATH] [--local DIR] [--owner PID]
#   scripts/hosts.sh [-n LAB] exec HOST COMMAND...   # COMMAND on HOST (exec'd: it keeps this pid)
#   scripts/hosts.sh [-n LAB] addr HOST              # HOST's address
#   scripts/hosts.sh [-n LAB] cut HOST               # pull HOST's cable ...
#   scripts/hosts.sh [-n LAB] mend HOST              # ... and plug it back in
#   scripts/hosts.sh [-n LAB] down                   # end every process on the hosts, then the hosts
#   scripts/hosts.sh list                            # the labs that are up: host, address, link, pid
#   scripts/hosts.sh check                           # can this machine make them? (exit 1: why not)
#
# A lab (LAB: -n, else $HARNESS_HOSTS_LAB, else "hosts") is one bridge and N hosts; several labs can
# be up side by side. `up 3` names the hosts node1..node3; `up alpha beta` names them yourself.
#
# Namespaces are held by processes, not by names under /run/netns. Each host's holder (a `sleep` whose
# argv[0] is harness-hosts:<lab>:<host>) is the first process of its own network, UTS and mount
# namespaces; the bridge's holder (harness-hosts:<lab>:bridge) owns a network namespace with br0.
# The kernel frees a namespace with its last process, and with it the veth, the bind mounts and the
# hostname: once the processes are gone (kill -9 included) nothing is left to clean up.
#
# Network: host i has eth0 with 198.18.0.<i>/24 (198.18.0.0/15 is set aside for network test
# benches, RFC 2544); its peer v<i> is a port of br0. The bridge lives in a namespace of its own, not
# in the machine's, where br_netfilter or a FORWARD policy could drop bridged frames. The machine's
# namespace gets no interface, address or route: the hosts reach each other and their own loopback,
# nothing else (no default route; no DNS: resolv.conf names 127.0.0.1, where nothing answers). Every
# lab uses the same addresses: labs share no wire. Interface names are fixed and short (br0, v<i>,
# eth0): each lives in a namespace of the lab's own.
#
# Names: in each host the hostname is HOST and /etc/hosts (bound over the machine's, in the host's
# mount namespace) names every host of the lab with its 198.18 address. A host's own name must not
# resolve to loopback (Debian's 127.0.1.1 line): gloo and torchrun would advertise an address its
# peers cannot reach. So gloo needs no GLOO_SOCKET_IFNAME here (eth0 on every host, if you set it).
#
# Disks: each host's node-local directory LOCAL/HOST (--local, default /var/tmp/harness-hosts/<lab>)
# is bound over the data cache path (--cache, default $HARNESS_CACHE or ~/.cache/harness), so jobs
# that inherit one environment still get a cache per host. Everything else, the run directory
# included, is shared, as on a cluster file system. /sys is mounted afresh (as `ip netns exec` does),
# so /sys/class/net shows the host's own interfaces.
#
# cut: v<i> goes down in the bridge: eth0 on the host loses carrier, frames both ways are dropped,
# and open TCP connections neither close nor fail (as with a pulled cable). mend: v<i> up again.
# down: SIGTERM to every process in a namespace of the lab (found by /proc/*/ns), SIGKILL after
# $HARNESS_HOSTS_GRACE seconds (default 3), then the holders, then the state under
# $HARNESS_HOSTS_STATE/<lab> (default /run/harness-hosts). --owner PID starts a reaper
# (harness-hosts:<lab>:reaper) that runs `down` once PID has ended: a test runner killed with
# SIGKILL leaves no lab behind.
set -euo pipefail

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
STATE_ROOT=${HARNESS_HOSTS_STATE:-/run/harness-hosts}
GRACE_S=${HARNESS_HOSTS_GRACE:-3}
SUBNET=198.18.0
MAX_HOSTS=250
LAB=${HARNESS_HOSTS_LAB:-hosts}

log() { echo "[hosts.sh $LAB] $*" >&2; }
die() { echo "hosts.sh: $*" >&2; exit 1; }
usage() { sed -n '5,12p' "$SCRIPT" | sed 's/^# \{0,1\}//' >&2; exit 2; }

lab_dir() { D=$STATE_ROOT/$LAB; }

# ---------------------------------------------------------------------------------------------
# holders

arg0() {  # pid -> its argv[0] (empty when it is gone)
    local a=""
    { IFS= read -r -d '' a < "/proc/$1/cmdline"; } 2>/dev/null || true
    printf '%s' "$a"
}

holder_pid() {  # name -> pid of the lab's live holder of that name (pid files can outlive processes)
    local pid
    pid=$(cat "$D/$1.pid" 2>/dev/null) || return 1
    [ "$(arg0 "$pid")" = "harness-hosts:$LAB:$1" ] || return 1
    echo "$pid"
}

holders() {  # pids of the lab's holders, by argv[0]: one grep over /proc, no fork per process
    # (not the reaper: a bash whose subshells carry its argv[0] for a moment)
    # a process that ends between the glob and the read makes grep exit 2: not a failure here
    { grep -zlsE "^harness-hosts:$LAB:[a-z0-9-]+\$" /proc/[0-9]*/cmdline || true; } | tr '\0' '\n' \
        | awk -F/ '{ print $3 }' | while read -r pid; do
            case $(arg0 "$pid") in "harness-hosts:$LAB:reaper" | "") ;; *) echo "$pid" ;; esac
        done
}

start_holder() {  # name setup-script unshare-flags...: start a holder, wait for its pid file
    local name=$1 setup=$2 pid="" bg
    shift 2
    # shellcheck disable=SC2016  # $$, $0 and $1 are the holder's own, expanded by its bash
    # setsid: not in the caller's process group, so a Ctrl-C meant for a later command misses it.
    # The holder is no group leader here, so setsid does not fork: $! is the holder.
    setsid unshare "$@" -- bash -c "$setup"'
        echo $$ > "$0.tmp" && mv "$0.tmp" "$0"
        exec -a "$1" sleep infinity' "$D/$name.pid" "harness-hosts:$LAB:$name" \
        </dev/null >/dev/null 2>>"$D/holders.log" &
    bg=$!
    disown "$bg"  # taken down by `down`, not by this shell: no job-control notice when it ends
    for _ in $(seq 1 200); do
        pid=$(holder_pid "$name" 2>/dev/null) && break
        kill -0 "$bg" 2>/dev/null || die "the holder of $name failed: $(tail -n 5 "$D/holders.log")"
        sleep 0.05
    done
    [ -n "$pid" ] || die "the holder of $name did not start within 10 s"
    echo "$pid"
}

in_ns() {  # name command...: run in the network namespace of a holder
    local pid
    pid=$(holder_pid "$1") || die "$1 is not up in lab $LAB (scripts/hosts.sh list)"
    shift
    nsenter -t "$pid" --net -- "$@"
}

# ---------------------------------------------------------------------------------------------
# up

host_names() {  # N | names... -> one name a line
    if [ $# -eq 1 ] && [[ $1 =~ ^[0-9]+$ ]]; then
        local n=$1 w=1 i
        if [ "$n" -lt 1 ] || [ "$n" -gt $MAX_HOSTS ]; then die "up $n: between 1 and $MAX_HOSTS hosts"; fi
        [ "$n" -ge 10 ] && w=${#n}
        for i in $(seq 1 "$n"); do printf "node%0${w}d\n" "$i"; done
        return
    fi
    printf '%s\n' "$@"
}

check_names() {
    local name
    [ "$#" -le $MAX_HOSTS ] || die "up: at most $MAX_HOSTS hosts"
    for name in "$@"; do
        [[ $name =~ ^[a-z]([a-z0-9-]{0,30}[a-z0-9])?$ ]] \
            || die "host name '$name': lower-case letters, digits and '-', starting with a letter, up to 32"
        case $name in bridge | reaper) die "host name '$name' is reserved" ;; esac
    done
    [ "$(printf '%s\n' "$@" | sort | uniq -d)" = "" ] || die "up: a host name is given twice: $*"
}

write_files() {  # names...: the lab's hosts file, resolv.conf and host table
    local i=0 name
    {
        echo "# lab $LAB (scripts/hosts.sh): bound over /etc/hosts in each of its hosts"
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
        for name in "$@"; do i=$((i + 1)); printf '%s.%d\t%s\n' "$SUBNET" "$i" "$name"; done
    } > "$D/hosts"
    {
        echo "# lab $LAB (scripts/hosts.sh): no DNS in the lab; every name is in /etc/hosts"
        echo "nameserver 127.0.0.1"
        echo "options timeout:1 attempts:1"
    } > "$D/resolv.conf"
    i=0
    for name in "$@"; do i=$((i + 1)); printf '%d %s %s.%d\n' "$i" "$name" "$SUBNET" "$i"; done > "$D/hosts.tsv"
}

up() {
    local names=() cache=${HARNESS_CACHE:-$HOME/.cache/harness} local_dir="" owner="" made=0
    while [ $# -gt 0 ]; do
        case $1 in
            --cache) cache=${2:?--cache PATH}; shift 2 ;;
            --local) local_dir=${2:?--local DIR}; shift 2 ;;
            --owner) owner=${2:?--owner PID}; shift 2 ;;
            -*) usage ;;
            *) names+=("$1"); shift ;;
        esac
    done
    [ ${#names[@]} -ge 1 ] || usage
    check >/dev/null  # the reason, rather than the first command that fails
    mapfile -t names < <(host_names "${names[@]}")
    check_names "${names[@]}"
    [ -z "$owner" ] || alive "$owner" || die "--owner $owner: no such process"
    [ -n "$local_dir" ] || { local_dir=/var/tmp/harness-hosts/$LAB; made=1; }
    mkdir -p "$STATE_ROOT" "$cache"
    cache=$(cd "$cache" && pwd -P)
    mkdir "$D" 2>/dev/null || die "lab $LAB is up already (scripts/hosts.sh -n $LAB down), or $D is in the way"
    trap up_failed EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$local_dir"
    local_dir=$(cd "$local_dir" && pwd -P)
    printf 'LOCAL=%q\nLOCAL_MADE=%d\nCACHE=%q\n' "$local_dir" "$made" "$cache" > "$D/lab.env"
    write_files "${names[@]}"
    start_holder bridge '
        ip link set lo up && ip link add br0 type bridge && ip link set br0 up
        # br_netfilter, where loaded, would send bridged frames through this namespace'"'"'s (empty) iptables
        [ ! -w /proc/sys/net/bridge/bridge-nf-call-iptables ] || echo 0 > /proc/sys/net/bridge/bridge-nf-call-iptables
    ' --net >/dev/null
    local i=0 name pid
    for name in "${names[@]}"; do
        i=$((i + 1))
        mkdir -p "$local_dir/$name"
        # shellcheck disable=SC2016  # expanded by the holder's bash, from its environment
        pid=$(HOST=$name D=$D LOCAL=$local_dir/$name CACHE=$cache start_holder "$name" '
            set -e
            hostname "$HOST"
            mount --bind "$D/hosts" /etc/hosts
            mount --bind "$D/resolv.conf" /etc/resolv.conf
            mount --bind "$LOCAL" "$CACHE"
            mount -t sysfs sysfs /sys
            ip link set lo up
        ' --net --uts --mount --propagation private)
        in_ns bridge ip link add "v$i" type veth peer name eth0 netns "$pid"
        in_ns bridge ip link set "v$i" master br0 up
        in_ns "$name" ip addr add "$SUBNET.$i/24" dev eth0
        in_ns "$name" ip link set eth0 up
    done
    if [ -n "$owner" ]; then
        # shellcheck disable=SC2016
        setsid bash -c 'exec -a "$0" bash "$@"' "harness-hosts:$LAB:reaper" "$SCRIPT" -n "$LAB" _reap "$owner" \
            </dev/null >/dev/null 2>&1 &
        echo $! > "$D/reaper.pid"
        disown $!
    fi
    trap - EXIT INT TERM
    log "up: ${#names[@]} hosts on br0; node-local $local_dir/<host> over $cache"
    cat "$D/hosts.tsv"
}

alive() {  # pid: running (a zombie has ended: its parent just has not reaped it yet)
    local stat=""
    { read -r stat < "/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

up_failed() {  # EXIT trap of `up`: a failure (or Ctrl-C) takes down whatever was made
    local rc=$?
    trap - EXIT INT TERM
    if [ $rc -ne 0 ]; then log "up failed; taking down what was made"; down_lab; fi
}

reap() {  # owner pid: take the lab down once it has ended (or leave when the lab is gone)
    while [ -d "$D" ] && alive "$1"; do sleep 1; done
    if [ -d "$D" ]; then log "owner $1 has ended: taking the lab down"; down_lab; fi
}

# ---------------------------------------------------------------------------------------------
# down

ns_ids() {  # pids... -> the network and mount namespaces they hold that are not this script's own
    local pid kind id
    for pid in "$@"; do
        for kind in net mnt; do
            # the bridge's holder shares our mount namespace, the reaper both: never match every process
            id=$(readlink "/proc/$pid/ns/$kind" 2>/dev/null) || continue
            [ "$id" = "$(readlink "/proc/$$/ns/$kind")" ] || echo "$id"
        done
    done
}

in_lab_ns() {  # ids...: pids of the processes in one of those namespaces, but the lab's own (holders)
    local skip
    skip=" $(holders | tr '\n' ' ') "
    { QUOTING_STYLE=literal stat -c '%N' /proc/[0-9]*/ns/net /proc/[0-9]*/ns/mnt 2>/dev/null || true; } \
        | awk -v ids=" $* " -v skip="$skip" -v me=$$ '{
            split($1, p, "/"); pid = p[3]
            if (index(ids, " " $3 " ") && !index(skip, " " pid " ") && pid != me && !(pid in seen)) {
                seen[pid] = 1; print pid
            }
        }'
}

down_lab() {
    local holders ids procs left=() waited=0 pid
    mapfile -t holders < <(holders)
    pid=$(holder_pid reaper) && [ "$pid" != $$ ] && holders+=("$pid")
    mapfile -t ids < <(ns_ids "${holders[@]}" | sort -u)
    if [ ${#ids[@]} -gt 0 ]; then
        mapfile -t procs < <(in_lab_ns "${ids[@]}")
        if [ ${#procs[@]} -gt 0 ]; then
            log "down: SIGTERM to ${#procs[@]} processes on the hosts (${procs[*]})"
            kill -TERM "${procs[@]}" 2>/dev/null || true
            while [ $waited -lt $((GRACE_S * 10)) ]; do
                mapfile -t left < <(in_lab_ns "${ids[@]}")
                [ ${#left[@]} -gt 0 ] || break
                sleep 0.1
                waited=$((waited + 1))
            done
            mapfile -t left < <(in_lab_ns "${ids[@]}")
            if [ ${#left[@]} -gt 0 ]; then
                log "down: SIGKILL to ${#left[@]} processes still running after ${GRACE_S} s (${left[*]})"
                kill -KILL "${left[@]}" 2>/dev/null || true
                for _ in $(seq 1 40); do
                    mapfile -t left < <(in_lab_ns "${ids[@]}")
                    [ ${#left[@]} -gt 0 ] || break
                    sleep 0.05
                done
                [ ${#left[@]} -eq 0 ] || log "down: ${left[*]} still running after SIGKILL (uninterruptible?)"
            fi
        fi
    fi
    [ ${#holders[@]} -eq 0 ] || kill -KILL "${holders[@]}" 2>/dev/null || true
    for _ in $(seq 1 100); do
        [ -n "$(holders)" ] || break
        sleep 0.05
    done
    if [ -f "$D/lab.env" ]; then
        local LOCAL="" LOCAL_MADE=0
        # shellcheck disable=SC1091
        source "$D/lab.env"
        if [ "$LOCAL_MADE" = 1 ]; then
            rm -rf "$LOCAL"
            rmdir "$(dirname "$LOCAL")" 2>/dev/null || true  # the last lab takes the folder with it
        fi
    fi
    rm -rf "$D"
    [ ${#left[@]} -eq 0 ]  # a failure, for whoever checks: processes kept the lab's namespaces alive
}

# ---------------------------------------------------------------------------------------------
# the rest

host_field() {  # host field(1 index, 3 address)
    [ -f "$D/hosts.tsv" ] || die "lab $LAB is not up (scripts/hosts.sh list)"
    awk -v h="$1" -v f="$2" '$2 == h { print $f; found = 1 } END { exit !found }' "$D/hosts.tsv" \
        || die "no host '$1' in lab $LAB (hosts: $(awk '{printf "%s ", $2}' "$D/hosts.tsv"))"
}

set_link() {  # host up|down
    local i
    i=$(host_field "$1" 1)
    in_ns bridge ip link set "v$i" "$2"
    if [ "$2" = down ]; then touch "$D/$1.cut"; else rm -f "$D/$1.cut"; fi
}

list() {
    local d lab i host addr state pid
    printf '%-16s %-16s %-14s %-6s %s\n' LAB HOST ADDRESS LINK PID
    for d in "$STATE_ROOT"/*/; do
        [ -f "$d/hosts.tsv" ] || continue
        lab=$(basename "$d")
        while read -r i host addr; do
            pid=$(LAB=$lab D=${d%/} holder_pid "$host") || pid="-"
            state=up
            [ ! -e "$d/$host.cut" ] || state="cut"
            [ "$pid" != "-" ] || state=dead
            printf '%-16s %-16s %-14s %-6s %s\n' "$lab" "$host" "$addr" "$state" "$pid"
        done < "$d/hosts.tsv"
    done
}

check() {
    local tool
    [ "$(id -u)" = 0 ] || die "needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    for tool in ip unshare nsenter setsid mount; do
        command -v "$tool" >/dev/null || die "needs $tool (Debian: apt-get install iproute2 util-linux mount)"
    done
    local out
    out=$(unshare --net --uts --mount --propagation private -- bash -c '
        set -e
        hostname harness-check
        mount -t sysfs sysfs /sys
        ip link add br0 type bridge
        ip link add v1 type veth peer name eth0
        ip link set eth0 master br0' 2>&1) \
        || die "cannot make network, UTS and mount namespaces with a bridge and a veth here: $out"
    echo "hosts.sh check: ok (namespaces, bridge, veth)"
}

while [ $# -gt 0 ]; do
    case $1 in
        -n | --name) LAB=${2:?-n LAB}; shift 2 ;;
        -h | --help) usage ;;
        *) break ;;
    esac
done
[[ $LAB =~ ^[a-z0-9][a-z0-9_-]{0,39}$ ]] || die "lab name '$LAB': letters, digits, '-' and '_', up to 40"
lab_dir
CMD=${1:-}
[ $# -eq 0 ] || shift
case $CMD in
    up) up "$@" ;;
    exec)
        [ $# -ge 2 ] || usage
        host_field "$1" 1 >/dev/null
        pid=$(holder_pid "$1") || die "host $1 of lab $LAB is not running (scripts/hosts.sh list)"
        shift
        # nsenter leaves the mount namespace's root as the working directory: keep ours
        exec nsenter -t "$pid" --net --uts --mount --wd="$PWD" -- "$@"
        ;;
    addr) [ $# -eq 1 ] || usage; host_field "$1" 3 ;;
    cut) [ $# -eq 1 ] || usage; set_link "$1" down ;;
    mend) [ $# -eq 1 ] || usage; set_link "$1" up ;;
    down) [ $# -eq 0 ] || usage; down_lab ;;
    list) list ;;
    check) check ;;
    _reap) reap "$1" ;;
    *) usage ;;
esac
