#!/usr/bin/env bash
# Live migration between two pyxen "hosts" on one machine. Run as root from the repository
# (after ./tools/setup.sh):
#     examples/migrate-pair.sh [ROUND_TRIPS]        (default 2: A->B->A->B->A)
#
# The two hosts are network namespaces, each with its own bridge pyxenbr0 and its own pyxen
# (run/state/log directories, xenstored, and a pyxend whose relocation service listens on
# the host's address, port 8002); a veth pair joins the bridges, as two machines on a switch:
#
#     ns A: pyxenbr0 10.88.0.1/24 --- veth ==== veth --- pyxenbr0 10.88.0.2/24 :ns B
#
# One guest (128 MiB, software engine) boots on A with a 32 MiB disk (xvdb; the same image
# path on both hosts, i.e. shared storage) and a NIC on pyxenbr0 at 10.88.0.70. In the guest a
# loop appends 1, 2, 3, ... to a file on the disk; from A's namespace a pinger sends one ICMP
# echo per second to the guest. The guest is migrated back and forth with `pyxen migrate`.
# Checked at the end: the file holds 1..N with nothing lost or repeated, at most 2 pings were
# lost, and e2fsck finds the disk image clean. Exits 0 only if every check passes; the
# namespaces, processes and temporary files are removed in every case. PYXEN_PYTHON names
# another Python with pyxen installed (default: the repository's .venv/bin/python).
set -euo pipefail

ROUNDS=${1:-2}
case $ROUNDS in ''|*[!0-9]*|0) echo "usage: $0 [ROUND_TRIPS >= 1]" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "migrate-pair: must run as root (network namespaces)" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYXEN_PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || { echo "migrate-pair: $PY missing: run ./tools/setup.sh first" >&2; exit 2; }
for tool in ip e2fsck; do
    command -v $tool >/dev/null || { echo "migrate-pair: '$tool' not found" >&2; exit 2; }
done

NAME=migrate-pair                          # the domain's name (each host has its own list)
GUEST_IP=10.88.0.70
ADDR_A=10.88.0.1 ADDR_B=10.88.0.2
NS_A=pxma$$ NS_B=pxmb$$                    # unique names: this script's process ID
VETH_A=pxmva$$ VETH_B=pxmvb$$              # (interface names: 15 characters at most)
T0=$(date +%s)
dir=$(mktemp -d /tmp/migrate-pair.XXXXXX)  # hosts' directories, the disk image, the logs
pinger=
made_ns=

say() { echo "migrate-pair: $*"; }
die() { echo "migrate-pair: FAILED: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------ clean-up
stop_host() {      # stop host $1's pyxend (pid from its API), then anything else run from
    local d=$dir/$1 pid p pids=""        # its directory (xenstored, domains' VMMs)
    pid=$("$PY" "$dir/guest.py" "$d/run/pyxend.sock" pid 2>/dev/null) && kill "$pid" 2>/dev/null
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" != $$ ] || continue
        if grep -qsaF "$d/" "$p/cmdline" || grep -qsaF "PYXEN_RUN_DIR=$d/run" "$p/environ"; then
            pids="$pids ${p#/proc/}"
        fi
    done
    [ -z "${pid:-}" ] || pids="$pids $pid"
    [ -n "$pids" ] || return 0
    kill $pids 2>/dev/null
    for _ in $(seq 50); do             # up to 5 s to exit, then SIGKILL
        kill -0 $pids 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL $pids 2>/dev/null
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ $rc -ne 0 ]; then
        for h in A B; do
            [ -s "$dir/$h/log/pyxend.log" ] || continue
            echo "--- host $h: last lines of pyxend.log" >&2
            tail -n 15 "$dir/$h/log/pyxend.log" >&2
        done
    fi
    [ -z "$pinger" ] || { kill "$pinger" 2>/dev/null; wait "$pinger" 2>/dev/null; }
    for h in A B; do
        [ -S "$dir/$h/run/pyxend.sock" ] && px $h destroy "$NAME" >/dev/null 2>&1
        stop_host $h
    done
    if [ -n "$made_ns" ]; then
        ip netns del "$NS_A" 2>/dev/null
        ip netns del "$NS_B" 2>/dev/null
        ip link del "$VETH_A" 2>/dev/null      # only if setup stopped before moving it
    fi
    rm -rf "$dir"
    exit $rc
}
trap cleanup EXIT
trap 'echo "migrate-pair: interrupted; cleaning up" >&2; exit 130' INT TERM
trap 'echo "migrate-pair: FAILED (line $LINENO: $BASH_COMMAND)" >&2' ERR

# ------------------------------------------------------------------------------ helpers
# px A|B ARGS...: run pyxen as host A or B: inside its namespace, with its own directories.
# The first command run this way starts the host's pyxend (and its xenstored).
px() {
    local h=$1 ns addr; shift
    if [ "$h" = A ]; then ns=$NS_A addr=$ADDR_A; else ns=$NS_B addr=$ADDR_B; fi
    ip netns exec "$ns" env -u PYXEN_SOCKET PYXEN_RUN_DIR="$dir/$h/run" \
        PYXEN_STATE_DIR="$dir/$h/st" PYXEN_LOG_DIR="$dir/$h/log" \
        XENSTORED_PATH="$dir/$h/run/xs.sock" PYXEN_RELOCATION="$addr:8002" \
        "$PY" -m pyxen.cli.main "$@"
}

# gsh A|B 'COMMAND' [TIMEOUT]: run COMMAND in the guest's shell, through its console socket
# (whose path host A's or B's pyxend gives: GET /v1/domains/NAME); prints its output, fails
# with its exit status.
gsh() { "$PY" "$dir/guest.py" "$dir/$1/run/pyxend.sock" sh "$NAME" "${3:-60}" "$2"; }

cat > "$dir/guest.py" <<'EOF'
"""guest.py API_SOCKET pid | guest.py API_SOCKET sh NAME TIMEOUT COMMAND"""
import http.client, json, random, re, socket, sys, time

def api(sock: str, path: str):
    c = http.client.HTTPConnection("localhost", timeout=30)
    c.sock = socket.socket(socket.AF_UNIX)            # pyxend's API: HTTP on a Unix socket
    c.sock.settimeout(30)
    c.sock.connect(sock)
    c.request("GET", path)
    r = c.getresponse()
    body = json.loads(r.read() or b"null")
    if r.status != 200:
        sys.exit(f"migrate-pair: GET {path}: {r.status} {body}")
    return body

sock, what = sys.argv[1:3]
if what == "pid":
    print(api(sock, "/v1/info")["pyxend_pid"])
    sys.exit(0)
name, timeout, cmd = sys.argv[3], float(sys.argv[4]), sys.argv[5]
con = socket.socket(socket.AF_UNIX)                   # raw bytes to and from the guest's hvc0
con.connect(api(sock, f"/v1/domains/{name}")["console"])
con.settimeout(0.5)
n = random.randrange(10**6, 10**9)       # the echoed input shows $((n)), the output shows n
con.sendall(f"echo BEGIN-$(({n})); {cmd}; echo END-$(({n})) $?\n".encode())
buf, deadline = "", time.monotonic() + timeout
while (m := re.search(rf"BEGIN-{n}\r?\n(.*)END-{n} (\d+)", buf, re.S)) is None:
    if time.monotonic() > deadline:
        sys.exit(f"migrate-pair: the guest did not finish {cmd!r} in {timeout:g} s; "
                 f"its console showed:\n{buf[-1500:]}")
    try:
        data = con.recv(65536)
    except socket.timeout:
        continue
    if not data:
        sys.exit("migrate-pair: the guest's console closed")
    buf += data.decode(errors="replace")
out = m.group(1).replace("\r", "")
sys.stdout.write(out)
if m.group(2) != "0":
    sys.exit(f"migrate-pair: in the guest, {cmd!r} failed (status {m.group(2)}):\n{out}")
EOF

on_host() {        # on_host A|B: is the domain in that host's `pyxen list`?
    px "$1" list | awk 'NR > 1 {print $1}' | grep -x "$NAME" >/dev/null
}

# ------------------------------------------------------------------------------ the two hosts
# The guest image is fetched here, in the machine's own namespace, if it is not cached yet:
# `pyxen create` would fetch it on first use, but the hosts' namespaces have no Internet.
say "checking the default Debian guest image (pyxen image)"
"$PY" -m pyxen.cli.main image >/dev/null || die "cannot get the default guest image"
say "creating hosts A ($NS_A, $ADDR_A) and B ($NS_B, $ADDR_B) under $dir"
made_ns=1
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add "$VETH_A" type veth peer name "$VETH_B"
ip link set "$VETH_A" netns "$NS_A"
ip link set "$VETH_B" netns "$NS_B"
for h in A B; do
    if [ $h = A ]; then ns=$NS_A veth=$VETH_A addr=$ADDR_A; else ns=$NS_B veth=$VETH_B addr=$ADDR_B; fi
    ip -n "$ns" link set lo up
    ip -n "$ns" link add pyxenbr0 type bridge
    ip -n "$ns" link set pyxenbr0 type bridge forward_delay 0
    ip -n "$ns" addr add "$addr/24" dev pyxenbr0
    ip -n "$ns" link set "$veth" master pyxenbr0
    ip -n "$ns" link set "$veth" up
    ip -n "$ns" link set pyxenbr0 up
    mkdir -p "$dir/$h"
    px $h list >/dev/null 2>"$dir/$h/start.log" \
        || { cat "$dir/$h/start.log" >&2; die "host $h's pyxend did not start"; }
done

# ------------------------------------------------------------------------------ the guest
truncate -s 32M "$dir/disk.img"
cat > "$dir/$NAME.cfg" <<EOF
name    = "$NAME"
type    = "pvh"
memory  = 128
kernel  = "debian/vmlinuz"
ramdisk = "debian/initrd.img"
extra   = "console=hvc0 quiet loglevel=1"
accel   = "tcg"
disk    = [ "$dir/disk.img,raw,xvdb,rw" ]
vif     = [ "bridge=pyxenbr0" ]
EOF
say "booting $NAME on host A (128 MiB, tcg, disk xvdb, NIC on pyxenbr0)"
px A create "$dir/$NAME.cfg" 2>&1 | sed 's/^/    /'
gsh A "echo booted" 120 >/dev/null
say "in the guest: mke2fs + mount xvdb, eth0 = $GUEST_IP/24, counter loop on the disk"
gsh A "mke2fs /dev/xvdb >/dev/null 2>&1 && mkdir -p /mnt && mount -t ext2 /dev/xvdb /mnt \
&& ip link set eth0 up && ip addr add $GUEST_IP/24 dev eth0"
gsh A "i=0; until ping -c1 -W1 $ADDR_A >/dev/null 2>&1; do i=\$((i+1)); [ \$i -lt 20 ] || exit 1; done" \
    || die "the guest cannot reach host A ($ADDR_A)"
gsh A "(i=0; while [ ! -e /tmp/stop ]; do i=\$((i+1)); echo \$i >> /mnt/c; usleep 50000; done; \
rm /tmp/stop) </dev/null >/dev/null 2>&1 & :"

say "pinging $GUEST_IP from host A's namespace, once a second"
ip netns exec "$NS_A" "$PY" -m pyxen.testing.pinger "$GUEST_IP" "$dir/ping.json" &
pinger=$!
sleep 2

# ------------------------------------------------------------------------------ migrations
pauses=()
cur=A
for i in $(seq $((2 * ROUNDS))); do
    if [ $cur = A ]; then dst=B daddr=$ADDR_B; else dst=A daddr=$ADDR_A; fi
    say "migration $i/$((2 * ROUNDS)): host $cur -> host $dst ($daddr)"
    px $cur migrate "$NAME" "$daddr" 2>"$dir/migrate.log" \
        || { cat "$dir/migrate.log" >&2; die "migration $i ($cur -> $dst) failed"; }
    grep -E '^(Migrated|Pause:)' "$dir/migrate.log" | sed 's/^/    /'
    pauses+=("$(sed -n 's/.*paused \([0-9.]*\) ms.*/\1/p' "$dir/migrate.log" | head -n 1)")
    on_host $dst || die "after migration $i, $NAME is not running on host $dst"
    ! on_host $cur || die "after migration $i, $NAME is still on host $cur"
    cur=$dst
    sleep 1
done

kill "$pinger"
wait "$pinger" || true
pinger=

# ------------------------------------------------------------------------------ checks
say "stopping the counter loop; checking the counter file, the pings and the filesystem"
gsh $cur "touch /tmp/stop; while [ -e /tmp/stop ]; do usleep 50000; done"
res=$(gsh $cur "awk 'NR != \$1 {bad++} END {print \"LINES=\" NR \" BAD=\" bad+0}' /mnt/c")
lines=$(echo "$res" | sed -n 's/^LINES=\([0-9]*\) BAD=.*/\1/p')
bad=$(echo "$res" | sed -n 's/^LINES=.* BAD=\([0-9]*\).*/\1/p')
[ -n "$lines" ] && [ -n "$bad" ] || die "cannot read the counter file: $res"
if [ "$bad" != 0 ]; then
    gsh $cur "awk 'NR != \$1 {print \"line \" NR \": \" \$1}' /mnt/c | head" >&2 || true
    die "the counter file has $bad lines out of sequence (values lost or repeated)"
fi
[ "$lines" -gt 20 ] || die "the counter only reached $lines: the loop did not run"

read -r sent lost seqs < <("$PY" -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(r["sent"], len(r["lost"]), ",".join(map(str, r["lost"])) or "-")' "$dir/ping.json")
[ "$sent" -ge 5 ] || die "the pinger sent only $sent pings"
[ "$lost" -le 2 ] || die "$lost of $sent pings were lost (sequence numbers $seqs; at most 2 allowed)"
if [ "$lost" = 0 ]; then seqs=""; else seqs=" (seq $seqs)"; fi

gsh $cur "sync && umount /mnt" >/dev/null
e2fsck -fn "$dir/disk.img" >"$dir/fsck.log" 2>&1 \
    || { cat "$dir/fsck.log" >&2; die "e2fsck found problems on the disk image"; }

say "destroying $NAME on host $cur"
px $cur destroy "$NAME"
! on_host $cur || die "$NAME survived pyxen destroy"

say "OK ($((2 * ROUNDS)) migrations, paused ${pauses[*]} ms; counter 1..$lines intact;" \
    "pings: $sent sent, $lost lost$seqs; e2fsck clean; $(( $(date +%s) - T0 )) s)"
