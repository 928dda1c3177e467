#!/usr/bin/env python3
"""xenstored throughput over the unix socket: pyxen's daemon against Debian's C xenstored.

What is measured: requests per second that one synchronous client gets from a xenstored
over its unix socket, speaking xs_wire (xen/include/public/io/xs_wire.h) directly: one
request, wait for its reply, next request -- what libxenstore does. The client below is
the same code for both daemons, so only the server differs. Workloads, on a store
populated with ``--keys`` nodes ``/bench/kNNNN`` of 16-byte values:

* ``read``   XS_READ of a random existing key;
* ``write``  XS_WRITE of a random existing key (same value size, so the store does not grow);
* ``mixed``  80 % reads, 20 % writes, interleaved;
* ``tx``     XS_TRANSACTION_START, 3 XS_READ + 2 XS_WRITE in the transaction,
             XS_TRANSACTION_END "T" -- 6 requests, counted as 6 ops (also reported as
             transactions/s);
* ``mixed_Nconn`` (``--conns N``, 0 disables) the mixed workload from N client processes
  at once, each on its own connection; ops/s is the total over the wall time.

Each workload runs ``--ops`` requests per run, ``--runs`` times, after an untimed warm-up;
runs alternate between the daemons so drift on a busy machine hits both. By default
(``--pin one``) the client and the daemons share one CPU: on this 2-vCPU VM a wake-up
across vCPUs costs more than the request, and unpinned runs swing by 3-4x depending on
where the scheduler puts the two processes (``--pin split``: daemons on their own CPU,
which is what the concurrent workload needs to load the server; ``--pin none``).

Reported per workload: the median ops/s and every run's; the round trip (1 / median
ops/s, single connection); the daemon's CPU time per request (``server_cpu_us_per_op``,
its threads' run time from /proc/PID/task/*/schedstat, kernel included) and the user-space
part of it (``server_user_us_per_op``, utime from /proc/PID/stat, 10 ms ticks). The
client's cost is the same for both daemons and is in ops/s but not in the CPU figures.
``ratio`` is pyxen ops/s / peer ops/s (1.0 parity, below 1 pyxen is slower);
``server_cpu_ratio`` is pyxen's CPU per request / the peer's. Both daemons get the same
requests (same seeds; concurrent clients write disjoint keys), so at the end their
stores must hold the same values: ``stores_match``.

The daemons, each started here in a private temp dir and stopped on exit:

* pyxen: ``.venv/bin/pyxen xenstored --socket DIR/socket`` (in memory, like the peer;
  ``--pyxen-state`` also measures one with ``--state DIR/state.json``, pyxen's JSON
  snapshot of the store).
* peer: ``/usr/lib/xen-4.17/bin/xenstored -N -D`` from Debian's ``xen-utils-4.17`` with
  ``XENSTORED_RUNDIR``/``XENSTORED_ROOTDIR`` in the temp dir (socket DIR/socket, never
  /run/xenstored). Without a hypervisor that does not work: ``-D`` (skip domain init)
  crashes on the first request, and without ``-D`` it exits because it cannot open
  /dev/xen/privcmd. The real error texts go to ``peer_error``. The bench then runs the
  same binary with ``-N`` under an LD_PRELOAD stub (``HVSTUB_C`` below, built with cc):
  the libxenctrl/evtchn/gnttab entry points it calls at start-up return dummy handles,
  and /proc/xen/xsd_port and /proc/xen/xsd_kva (dom0's event channel and ring page) are
  files in the temp dir that nobody writes to. The socket request path -- the one being
  measured -- runs unmodified. ``peer_mode`` says which way the numbers were obtained
  ("stock" or "hvstub"); ``peer_error`` is set whenever the stock daemon cannot serve,
  even when the stub run then supplies ``peer``. ``--no-stub`` skips the stub (``peer``
  is then null and only pyxen is measured).

Output: one JSON document on stdout; progress notes on stderr (none with --json-only).

Usage: bench/xenstore.py [--runs 5] [--ops 20000] [--keys 1000] [--conns 4]
                         [--pin one|split|none] [--pyxen-state] [--no-stub]
                         [--peer-bin PATH] [--json-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYXEN = Path(sys.executable).parent / "pyxen"
PEER_BIN = "/usr/lib/xen-4.17/bin/xenstored"
PEER_PACKAGE = "xen-utils-4.17"

WORKLOADS = {
    "read": "XS_READ of a random existing key",
    "write": "XS_WRITE of a random existing key (16-byte value)",
    "mixed": "80% XS_READ / 20% XS_WRITE, random existing keys",
    "tx": "TRANSACTION_START, 3 READ + 2 WRITE inside it, TRANSACTION_END T (6 ops)",
}


QUIET = False


def note(msg: str) -> None:
    if not QUIET:
        print(f"xenstore-bench: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the xs_wire client

XS_READ, XS_TRANSACTION_START, XS_TRANSACTION_END, XS_WRITE, XS_ERROR = 2, 6, 7, 11, 16
HDR = struct.Struct("<IIII")          # struct xsd_sockmsg: type, req_id, tx_id, len


class XsError(Exception):
    pass


class XsClient:
    """Synchronous xs_wire client on a unix socket: one request, then its reply."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.req_id = 0

    def close(self) -> None:
        self.sock.close()

    def call(self, typ: int, payload: bytes, tx: int = 0) -> bytes:
        """Send one request and return the reply payload; XsError on XS_ERROR."""
        self.req_id += 1
        self.sock.sendall(HDR.pack(typ, self.req_id, tx, len(payload)) + payload)
        return self._reply(typ, self.req_id)

    def send_packed(self, data: bytes, typ: int, req_id: int) -> bytes:
        """Like call() for a request packed in advance (header included)."""
        self.sock.sendall(data)
        return self._reply(typ, req_id)

    def _reply(self, typ: int, req_id: int) -> bytes:
        # The bench sets no watches, so the reply is the only message that can arrive.
        recv = self.sock.recv
        buf = recv(65536)
        while len(buf) < 16:
            more = recv(65536)
            if not more:
                raise ConnectionError("xenstored closed the connection")
            buf += more
        rtyp, rid, _tx, length = HDR.unpack_from(buf)
        while len(buf) < 16 + length:
            more = recv(65536)
            if not more:
                raise ConnectionError("xenstored closed the connection")
            buf += more
        payload = buf[16:16 + length]
        if rtyp == XS_ERROR:
            raise XsError(payload.rstrip(b"\0").decode(errors="replace"))
        if rtyp != typ or rid != req_id:
            raise XsError(f"unexpected reply type {rtyp} req_id {rid} (wanted {typ}/{req_id})")
        return payload


# ------------------------------------------------------------------ workloads

def key(i: int) -> bytes:
    return b"/bench/k%04d" % i


def value(i: int) -> bytes:
    return b"v%015d" % i              # 16 bytes


def populate(path: Path, keys: int) -> None:
    c = XsClient(path)
    try:
        for i in range(keys):
            c.call(XS_WRITE, key(i) + b"\0" + value(i))
    finally:
        c.close()


def simple_requests(kind: str, n: int, keys: int, seed: int, stride: int = 1,
                    offset: int = 0) -> list[tuple[bytes, int, int]]:
    """(packed request, type, req_id) for the read/write/mixed workloads, built in advance
    so the timed loop only sends and receives. req_ids start at 1000. Keys are drawn from
    those equal to ``offset`` modulo ``stride`` (concurrent clients get disjoint keys, so
    the final store does not depend on how their requests interleave)."""
    rng = random.Random(seed)
    out = []
    for j in range(n):
        k = rng.randrange(keys // stride) * stride + offset
        is_write = kind == "write" or (kind == "mixed" and rng.random() < 0.2)
        if is_write:
            typ, payload = XS_WRITE, key(k) + b"\0" + value(rng.randrange(10**15))
        else:
            typ, payload = XS_READ, key(k) + b"\0"
        rid = 1000 + j
        out.append((HDR.pack(typ, rid, 0, len(payload)) + payload, typ, rid))
    return out


def run_simple(c: XsClient, reqs: list[tuple[bytes, int, int]]) -> float:
    send = c.send_packed
    t0 = time.perf_counter()
    for data, typ, rid in reqs:
        send(data, typ, rid)
    return time.perf_counter() - t0


def run_tx(c: XsClient, n_tx: int, keys: int, seed: int) -> tuple[float, int]:
    """n_tx transactions of 3 reads + 2 writes; returns (seconds, EAGAIN conflicts).
    A transaction that ends in EAGAIN is counted and not retried."""
    rng = random.Random(seed)
    plan = [([key(rng.randrange(keys)) + b"\0" for _ in range(3)],
             [key(rng.randrange(keys)) + b"\0" + value(rng.randrange(10**15)) for _ in range(2)])
            for _ in range(n_tx)]
    conflicts = 0
    call = c.call
    t0 = time.perf_counter()
    for reads, writes in plan:
        tx = int(call(XS_TRANSACTION_START, b"\0").rstrip(b"\0"))
        for r in reads:
            call(XS_READ, r, tx)
        for w in writes:
            call(XS_WRITE, w, tx)
        try:
            call(XS_TRANSACTION_END, b"T\0", tx)
        except XsError as e:
            if str(e) != "EAGAIN":
                raise
            conflicts += 1
    return time.perf_counter() - t0, conflicts


def _conn_worker(path: str, reqs: list, barrier, results) -> None:  # type: ignore[no-untyped-def]
    c = XsClient(path)
    barrier.wait()
    try:
        results.put(("ok", run_simple(c, reqs)))
    except Exception as e:        # reported by the parent
        results.put(("error", f"{type(e).__name__}: {e}"))
    finally:
        c.close()


def run_concurrent(path: Path, conns: int, ops: int, keys: int, seed: int) -> float:
    """The mixed workload from ``conns`` processes; returns wall seconds for all ops."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(conns + 1)
    results = ctx.Queue()
    per = ops // conns
    procs = [ctx.Process(target=_conn_worker, daemon=True,
                         args=(str(path),
                               simple_requests("mixed", per, keys, seed, conns, i),
                               barrier, results))
             for i in range(conns)]
    for p in procs:
        p.start()
    barrier.wait(timeout=30)
    t0 = time.perf_counter()
    got = [results.get(timeout=300) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=10)
    errors = [msg for status, msg in got if status != "ok"]
    if errors:
        raise RuntimeError(f"concurrent client failed: {errors[0]}")
    return wall


# ------------------------------------------------------------------ the daemons

HVSTUB_C = r"""
/* LD_PRELOAD stub: lets Xen's C xenstored start without a hypervisor. The hypervisor
 * interfaces it opens at start-up return a dummy handle; the event-channel fd is an
 * eventfd that never fires; /proc/xen/xsd_port and /proc/xen/xsd_kva (dom0's event
 * channel and ring page) are redirected to files in $HVSTUB_DIR. Socket clients are
 * served by the daemon's own, unmodified code. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/types.h>

static int handle;
static int evfd = -1;
static uint32_t next_port = 10;

void *xc_interface_open(void *l, void *dl, unsigned f) { return &handle; }
int xc_interface_close(void *h) { return 0; }
int xc_domain_getinfo(void *h, uint32_t first, unsigned max, void *info) { return 0; }
void *xengnttab_open(void *l, unsigned f) { return &handle; }
int xengnttab_close(void *h) { return 0; }
int xengnttab_set_max_grants(void *h, uint32_t n) { return 0; }
void *xengnttab_map_grant_ref(void *h, uint32_t d, uint32_t r, int p) { return NULL; }
int xengnttab_unmap(void *h, void *a, uint32_t n) { return 0; }
void *xenevtchn_open(void *l, unsigned f) { return &handle; }
void *xenevtchn_fdopen(void *l, int fd, unsigned f) { return &handle; }
int xenevtchn_fd(void *h) { if (evfd < 0) evfd = eventfd(0, EFD_CLOEXEC); return evfd; }
int xenevtchn_bind_virq(void *h, unsigned v) { return next_port++; }
int xenevtchn_bind_interdomain(void *h, uint32_t d, uint32_t p) { return next_port++; }
int xenevtchn_notify(void *h, uint32_t p) { return 0; }
int xenevtchn_unmask(void *h, uint32_t p) { return 0; }
int xenevtchn_unbind(void *h, uint32_t p) { return 0; }
int xenevtchn_pending(void *h) { return -1; }

int open(const char *path, int flags, ...)
{
	static int (*real_open)(const char *, int, ...);
	char buf[4096];
	mode_t mode = 0;
	const char *dir = getenv("HVSTUB_DIR");

	if (!real_open)
		real_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
	if (flags & O_CREAT) {
		va_list ap;
		va_start(ap, flags);
		mode = va_arg(ap, mode_t);
		va_end(ap);
	}
	if (dir && strncmp(path, "/proc/xen/", 10) == 0) {
		snprintf(buf, sizeof(buf), "%s/%s", dir, path + 10);
		path = buf;
	}
	return real_open(path, flags, mode);
}
"""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the bench dies without cleaning up."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class DaemonFailed(Exception):
    pass


class Daemon:
    """A xenstored child process serving ``socket`` (its stderr kept in ``log``)."""

    cpus: set[int] | None = None                 # CPU affinity of every daemon (--pin)

    def __init__(self, name: str, argv: list[str], socket_path: Path, log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.socket, self.log = name, argv, socket_path, log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start and wait until the socket answers an XS_READ of /; DaemonFailed if not."""
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DaemonFailed(self._death())
            if self.socket.exists():
                try:
                    c = XsClient(self.socket, timeout=5)
                    try:
                        c.call(XS_READ, b"/\0")
                    finally:
                        c.close()
                    return
                except (OSError, XsError) as e:
                    time.sleep(0.2)
                    if self.proc.poll() is not None:
                        raise DaemonFailed(f"{self._death()} (while handling its first "
                                           f"request, XS_READ /; client saw: {e})") from None
            if time.monotonic() > deadline:
                raise DaemonFailed(f"socket {self.socket} not answering after {timeout:.0f} s")
            time.sleep(0.05)

    def _death(self) -> str:
        rc = self.proc.returncode if self.proc else None
        how = (f"killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0
               else f"exited with status {rc}")
        text = self.log.read_text(errors="replace").strip() if self.log.exists() else ""
        return f"{how}; output: {text!r}" if text else f"{how}; no output"

    def cpu_times(self) -> tuple[float, float]:
        """(total, user) CPU seconds of the daemon so far. Total is the sum of its threads'
        run time from /proc/PID/task/*/schedstat (ns resolution), falling back to
        utime + stime; user is utime from /proc/PID/stat (clock-tick resolution)."""
        assert self.proc is not None
        proc = Path(f"/proc/{self.proc.pid}")
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        user = int(fields[11]) / tick
        try:
            total = sum(int((t / "schedstat").read_text().split()[0])
                        for t in (proc / "task").iterdir()) / 1e9
        except (OSError, ValueError, IndexError):
            total = user + int(fields[12]) / tick
        return total, user

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def command_line(d: Daemon, extra_env: dict[str, str]) -> str:
    env = " ".join(f"{k}={v}" for k, v in extra_env.items())
    return f"{env} {' '.join(d.argv)}".strip()


def pyxen_daemon(tmp: Path, with_state: bool) -> Daemon:
    d = tmp / ("pyxen-state" if with_state else "pyxen")
    d.mkdir()
    argv = [str(PYXEN), "xenstored", "--socket", str(d / "socket")]
    if with_state:
        argv += ["--state", str(d / "state.json")]
    return Daemon("pyxen" + ("-state" if with_state else ""), argv, d / "socket", d / "log")


def peer_daemon(tmp: Path, peer_bin: str, use_stub: bool) -> tuple[Daemon | None, dict]:
    """Start the C xenstored: stock ``-N -D`` first, then (if that fails) under the stub.
    Returns (running daemon or None, info for the JSON)."""
    info: dict = {"peer_mode": None, "peer_command": None, "peer_error": None}
    if not os.access(peer_bin, os.X_OK):
        info["peer_error"] = (f"{peer_bin} not found: install {PEER_PACKAGE} "
                              "(apt-get install --no-install-recommends " + PEER_PACKAGE + ")")
        return None, info

    def make(tag: str, args: list[str], env: dict[str, str]) -> tuple[Daemon, dict]:
        d = tmp / f"peer-{tag}"
        (d / "run").mkdir(parents=True)
        (d / "lib").mkdir()
        env = {"XENSTORED_RUNDIR": str(d / "run"), "XENSTORED_ROOTDIR": str(d / "lib"), **env}
        return Daemon(f"peer-{tag}", [peer_bin, *args], d / "run" / "socket", d / "log", env), env

    errors = []
    stock, env = make("stock", ["-N", "-D"], {})
    try:
        stock.start()
        info.update(peer_mode="stock", peer_command=command_line(stock, env))
        return stock, info
    except DaemonFailed as e:
        stock.stop()
        errors.append(f"`xenstored -N -D` (no domain init): {e}")
    # Without -D it needs the hypervisor; only try where there is none (on a real dom0 it
    # would attach to dom0's xenstore ring).
    if not Path("/proc/xen").exists() and not Path("/dev/xen/privcmd").exists():
        full, env = make("nodashd", ["-N"], {})
        try:
            full.start(timeout=10)
            full.stop()         # unexpected, but then the failure above is the whole story
        except DaemonFailed as e:
            full.stop()
            errors.append(f"`xenstored -N`: {e}")
    info["peer_error"] = " | ".join(errors)
    if not use_stub:
        return None, info
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        info["peer_error"] += " | hvstub: no C compiler to build it"
        return None, info
    sdir = tmp / "hvstub"
    (sdir / "proc").mkdir(parents=True)
    (sdir / "hvstub.c").write_text(HVSTUB_C)
    p = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(sdir / "hvstub.so"),
                        str(sdir / "hvstub.c"), "-ldl"], capture_output=True, text=True)
    if p.returncode != 0:
        info["peer_error"] += f" | hvstub: build failed: {p.stderr.strip()[-500:]}"
        return None, info
    (sdir / "proc" / "xsd_port").write_text("1\n")
    with open(sdir / "proc" / "xsd_kva", "wb") as f:
        f.truncate(4096)
    stub, env = make("hvstub", ["-N"], {"LD_PRELOAD": str(sdir / "hvstub.so"),
                                        "HVSTUB_DIR": str(sdir / "proc")})
    try:
        stub.start()
    except DaemonFailed as e:
        stub.stop()
        info["peer_error"] += f" | under the hvstub: {e}"
        return None, info
    info.update(peer_mode="hvstub", peer_command=command_line(stub, env))
    return stub, info


def peer_version() -> str | None:
    p = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", PEER_PACKAGE],
                       capture_output=True, text=True)
    return (p.stdout.strip() or None) if p.returncode == 0 else None


def pyxen_version() -> str:
    p = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                       capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


# ------------------------------------------------------------------ measuring

def measure_once(d: Daemon, client: XsClient, workload: str, args: argparse.Namespace,
                 seed: int, ops: int | None = None) -> dict:
    """One run of one workload (``ops`` requests, default --ops): ops/s, the daemon's CPU
    (and user-space) µs per request, and for ``tx`` the EAGAIN conflicts."""
    n = ops or args.ops
    extra: dict = {}
    if workload == "tx":
        cpu0, user0 = d.cpu_times()
        n_tx = max(1, n // 6)
        secs, extra["conflicts"] = run_tx(client, n_tx, args.keys, seed)
        ops = n_tx * 6
    elif workload.startswith("mixed_"):
        cpu0, user0 = d.cpu_times()
        secs = run_concurrent(d.socket, args.conns, n, args.keys, seed)
        ops = (n // args.conns) * args.conns
    else:
        reqs = simple_requests(workload, n, args.keys, seed)
        cpu0, user0 = d.cpu_times()
        secs, ops = run_simple(client, reqs), len(reqs)
    cpu1, user1 = d.cpu_times()
    return {"ops_per_s": ops / secs, "cpu_us": (cpu1 - cpu0) / ops * 1e6,
            "user_us": (user1 - user0) / ops * 1e6, **extra}


def summarise(runs: list[dict], workload: str) -> dict:
    rates = [r["ops_per_s"] for r in runs]
    med = statistics.median(rates)
    out = {"ops_per_s": round(med),
           "runs_ops_per_s": [round(r) for r in rates],
           "server_cpu_us_per_op": round(statistics.median(r["cpu_us"] for r in runs), 2),
           "server_user_us_per_op": round(statistics.median(r["user_us"] for r in runs), 2)}
    if not workload.startswith("mixed_"):
        out["latency_us"] = round(1e6 / med, 1)
    if workload == "tx":
        out["transactions_per_s"] = round(med / 6)
        out["conflicts"] = sum(r["conflicts"] for r in runs)
    return out


def store_contents(path: Path, keys: int) -> list[bytes]:
    c = XsClient(path)
    try:
        return [c.call(XS_READ, key(i) + b"\0") for i in range(keys)]
    finally:
        c.close()


def pin(mode: str) -> dict | None:
    """Apply --pin: affinity of this process (the client) now, of the daemons at start."""
    allowed = sorted(os.sched_getaffinity(0))
    if mode == "none":
        return None
    if mode == "split" and len(allowed) < 2:
        raise SystemExit("--pin split needs two CPUs")
    client = allowed[0]
    daemon = allowed[1] if mode == "split" else client
    os.sched_setaffinity(0, {client})
    Daemon.cpus = {daemon}
    return {"client_cpu": client, "daemon_cpu": daemon}


def main() -> int:
    global QUIET
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per workload (median reported)")
    ap.add_argument("--ops", type=int, default=20000, help="requests per run")
    ap.add_argument("--keys", type=int, default=1000, help="nodes in the store")
    ap.add_argument("--conns", type=int, default=4,
                    help="connections for the concurrent mixed workload (0: skip it)")
    ap.add_argument("--pyxen-state", action="store_true",
                    help="also measure pyxen with --state (its JSON snapshot of the store)")
    ap.add_argument("--no-stub", action="store_true",
                    help="do not run the C xenstored under the hypervisor stub")
    ap.add_argument("--pin", choices=["one", "split", "none"], default="one",
                    help="one: client and daemons share one CPU (default, steadiest); "
                         "split: daemons on a second CPU; none: leave it to the scheduler")
    ap.add_argument("--peer-bin", default=PEER_BIN)
    ap.add_argument("--json-only", action="store_true", help="no progress notes on stderr")
    args = ap.parse_args()
    QUIET = args.json_only
    pinning = pin(args.pin)

    workloads = dict(WORKLOADS)
    if args.conns > 0:
        workloads[f"mixed_{args.conns}conn"] = f"mixed from {args.conns} connections at once"

    # SIGTERM/SIGHUP unwind through the finally below, so the daemons are stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: sys.exit(128 + s))

    daemons: list[Daemon] = []
    with tempfile.TemporaryDirectory(prefix="xenstore-bench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            subjects = {"pyxen": pyxen_daemon(tmp, False)}
            if args.pyxen_state:
                subjects["pyxen_state"] = pyxen_daemon(tmp, True)
            for d in subjects.values():
                daemons.append(d)
                try:
                    d.start()
                except DaemonFailed as e:
                    raise SystemExit(f"{d.name} did not start: {e}") from None
            note("starting the C xenstored")
            peer, info = peer_daemon(tmp, args.peer_bin, not args.no_stub)
            if info["peer_error"]:
                note(f"peer_error: {info['peer_error']}")
            if peer is not None:
                daemons.append(peer)
                subjects["peer"] = peer
                note(f"peer running ({info['peer_mode']}): {info['peer_command']}")

            clients = {}
            for name, d in subjects.items():
                note(f"populating {name} with {args.keys} keys")
                populate(d.socket, args.keys)
                clients[name] = XsClient(d.socket)
            note("warm-up")
            for w in workloads:
                for name, d in subjects.items():
                    measure_once(d, clients[name], w, args, seed=0, ops=min(args.ops, 2000))
            samples: dict[str, dict[str, list]] = {n: {w: [] for w in workloads}
                                                   for n in subjects}
            for run in range(args.runs):
                note(f"run {run + 1}/{args.runs}")
                for w in workloads:
                    for name, d in subjects.items():     # same seed: same requests
                        samples[name][w].append(
                            measure_once(d, clients[name], w, args, seed=run * 7919 + 1))
            for c in clients.values():
                c.close()
            # Both daemons got the same requests, so their stores must agree.
            stores_match = None
            if peer is not None:
                stores_match = (store_contents(subjects["pyxen"].socket, args.keys)
                                == store_contents(peer.socket, args.keys))
        finally:
            for d in daemons:
                d.stop()

    results = {n: {w: summarise(samples[n][w], w) for w in workloads} for n in subjects}
    peer_res = results.get("peer")
    mine = results["pyxen"]
    doc = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "os": _os_name()},
        "runs": args.runs,
        "ops_per_run": args.ops,
        "keys": args.keys,
        "pin": args.pin,
        "cpus": pinning,
        "workloads": workloads,
        "pyxen": mine,
        "pyxen_version": pyxen_version(),
        "pyxen_command": " ".join(subjects["pyxen"].argv),
        **({"pyxen_state": results["pyxen_state"],
            "pyxen_state_command": " ".join(subjects["pyxen_state"].argv)}
           if args.pyxen_state else {}),
        "peer": peer_res,
        "peer_name": f"Xen C xenstored (Debian {PEER_PACKAGE})",
        "peer_version": peer_version(),
        **info,
        "ratio": ({w: round(mine[w]["ops_per_s"] / peer_res[w]["ops_per_s"], 3)
                   for w in workloads} if peer_res else None),
        "ratio_meaning": "pyxen ops/s / peer ops/s (1.0 parity, < 1 pyxen slower)",
        "server_cpu_ratio": ({w: round(mine[w]["server_cpu_us_per_op"]
                                       / peer_res[w]["server_cpu_us_per_op"], 2)
                              for w in workloads} if peer_res else None),
        "server_cpu_ratio_meaning": "pyxen daemon CPU per request / peer's (> 1: pyxen "
                                    "uses more)",
        "stores_match": stores_match,
    }
    print(json.dumps(doc, indent=2))
    return 0


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return sys.platform


if __name__ == "__main__":
    sys.exit(main())
