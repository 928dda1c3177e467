#!/bin/sh
# Two pyxen guests on one bridge: each pings the other and the host, then guest A sends
# MIB MiB of random data to guest B over TCP (busybox nc) and the checksums are compared.
# Exits 0 when everything arrived intact. Run as root from the repository:
#     examples/net-pair.sh [MIB]        (default 100)
# The guests' NICs are TAPs (vif<domid>.0) on pyxen's default bridge pyxenbr0 (10.88.0.1/24),
# created if missing; the guests use 10.88.0.201 and .202.
set -eu
MIB=${1:-100}
PYXEN=${PYXEN:-$(dirname "$0")/../.venv/bin/pyxen}
MEM=$((MIB + 160))
dir=$(mktemp -d)
trap 'kill $pa $pb 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT INT TERM

echo "net-pair: booting guest B (receiver, 10.88.0.202)"
"$PYXEN" run --memory "$MEM" --timeout 600 --vif bridge=pyxenbr0 -- '
  ip link set eth0 up && ip addr add 10.88.0.202/24 dev eth0
  i=0; until ping -c1 -W1 10.88.0.1 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 30 ] || exit 3; done
  echo "B: host reachable"
  # busybox nc closes the connection when its stdin ends: give it a fifo this shell
  # holds open until the transfer is over
  mkfifo /tmp/hold
  nc -l -p 5000 < /tmp/hold > /tmp/in &
  ncpid=$!
  exec 3> /tmp/hold
  echo "B: listening"
  wait $ncpid
  ping -c 2 10.88.0.201 >/dev/null && echo "B: ping A ok"
  echo "B: received $(wc -c < /tmp/in) bytes, md5 $(md5sum < /tmp/in | cut -d" " -f1)"
' > "$dir/b.log" 2>&1 &
pb=$!
until grep -q "B: listening" "$dir/b.log" 2>/dev/null; do
    kill -0 $pb 2>/dev/null || { cat "$dir/b.log"; echo "net-pair: guest B failed"; exit 1; }
    sleep 0.5
done

echo "net-pair: booting guest A (sender, 10.88.0.201), $MIB MiB"
"$PYXEN" run --memory "$MEM" --timeout 600 --vif bridge=pyxenbr0 -- "
  ip link set eth0 up && ip addr add 10.88.0.201/24 dev eth0
  i=0; until ping -c1 -W1 10.88.0.202 >/dev/null 2>&1; do i=\$((i+1)); [ \$i -lt 30 ] || exit 3; done
  echo 'A: ping B ok'
  ping -c 2 10.88.0.1 >/dev/null && echo 'A: ping host ok'
  dd if=/dev/urandom of=/tmp/out bs=1M count=$MIB 2>/dev/null
  echo \"A: sending $MIB MiB, md5 \$(md5sum < /tmp/out | cut -d' ' -f1)\"
  t0=\$(date +%s); nc 10.88.0.202 5000 < /tmp/out; t1=\$(date +%s)
  echo \"A: sent in \$((t1 - t0)) s\"
" > "$dir/a.log" 2>&1 &
pa=$!
wait $pa || { cat "$dir/a.log"; echo "net-pair: guest A failed"; exit 1; }
wait $pb || { cat "$dir/b.log"; echo "net-pair: guest B failed"; exit 1; }
cat "$dir/a.log" "$dir/b.log"
sent=$(sed -n 's/^A: sending .* md5 \([0-9a-f]*\).*/\1/p' "$dir/a.log")
got=$(sed -n 's/^B: received .* md5 \([0-9a-f]*\).*/\1/p' "$dir/b.log")
if [ -n "$sent" ] && [ "$sent" = "$got" ] && grep -q "A: ping host ok" "$dir/a.log" \
        && grep -q "B: ping A ok" "$dir/b.log"; then
    echo "net-pair: OK ($MIB MiB intact, md5 $sent)"
    exit 0
fi
echo "net-pair: FAILED (sent md5 '$sent', received md5 '$got')"
exit 1
