#!/usr/bin/env python3
"""Live migration between two pyxen "hosts": pause (downtime), total time and volume, for an
idle guest and a memory-dirtying guest of two sizes, with QEMU's own live migration between
two QEMU TCG processes on the same kernel and initramfs as the peer.

Hosts: :class:`pyxen.testing.hostpair.HostPair`, two network namespaces (``pxa<tag>`` /
``pxb<tag>``, tag ``mg<pid>``), each with its own pyxend, xenstored and relocation service,
joined by a veth. Everything is removed at the end, also on failure, Ctrl-C or SIGTERM.

Guests (pyxen): ``type = "pvh"``, ``accel = "tcg"``, ``kernel = "debian/vmlinuz"``, ``ramdisk
= "debian/initrd.img"``, ``extra = "console=hvc0 quiet loglevel=1"``, 1 vCPU, no disk and no
NIC (the bench measures memory and CPU state only). Sizes: ``--sizes`` (default 96 and 256
MiB; 64 MiB does not boot this kernel: it panics "System is deadlocked on memory" during its
initcalls, on pyxen and on QEMU alike).

Workloads, each migrated ``--runs`` times back and forth (A->B, B->A, ...) with 1 s between:

* ``idle``: the guest sits at its shell prompt;
* ``dirty``: a background shell loop in the guest rewrites a ``--dirty-mib`` MiB file on the
  initramfs' tmpfs (``/tmp/x``) in place, 1 MiB at a time, forever: ``dd if=/tmp/blk
  of=/tmp/x bs=1M count=1 seek=$i conv=notrunc`` for i in 0..N-1, where ``/tmp/blk`` is
  1 MiB from ``/dev/urandom`` (non-zero data, so pages are sent as data, not as zero
  entries). Each pass bumps a counter in ``/tmp/passes``, from which the guest's own
  rewrite rate is computed (before the migrations, and across each migration).

Each pyxen migration is ``POST /v1/domains/{name}/migrate`` on the source pyxend's unix socket
(what ``pyxen migrate`` calls); its reply is the summary: total_ms, pause_ms (source quiesce
to the target reporting the guest running), bytes_sent, pages_sent (zero pages included),
rounds, dirty_history, pause_steps_ms. After each migration the bench checks, over the
console, that the guest answers on the target (and, for ``dirty``, that the loop still runs;
each dirty run also records ``guest_oom_kills`` / ``guest_late_timer``: OOM kills and "Long
readout interval" clocksource-watchdog lines the guest kernel logged across the migration).
A case that fails is reported with ``error`` and the guest kernel's OOM lines; the bench
carries on with the next size. Exit status 0 when nothing failed, 1 otherwise.

Peer (``--no-peer`` skips it): ``qemu-system-x86_64 -M microvm -accel tcg -cpu max -m SIZE``
on the same ELF kernel and initramfs (plus a run overlay whose command is the same loop, or
an idle ``sleep`` loop), the source in namespace A, the target (``-incoming tcp:10.88.0.2:P``)
in namespace B, over the same veth; QMP ``migrate``, polled with ``query-migrate``. QEMU's
settings: its defaults (``downtime-limit`` 300 ms) except ``max-bandwidth``, raised from
QEMU's 128 MiB/s to 10 GiB/s because pyxen does not cap its stream either. Reported:
QEMU's ``downtime`` (source side: VM stopped to the end of the stream), and the end-to-end
downtime from the QMP event time stamps (source ``STOP`` to target ``RESUME``), which is the
figure comparable with pyxen's pause_ms. pyxen's source-side equivalent is ``stream_pause_ms``
(pause_ms minus the target-restore and target-resume steps).

Prints one JSON object: ``cases`` (per size and workload: medians and raw runs), top-level
``pause_ms`` (the idle 256 MiB guest's median pause) and ``goal`` (pause_ms <= 50), ``peer``
(QEMU, same layout), ``reference`` (Xen's published figures, not measured here) and
``host``. Needs root (namespaces).

Usage: bench/migrate.py [--runs 5] [--sizes 96,256] [--dirty-mib 16] [--no-peer]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

GOAL_PAUSE_MS = 50.0
SETTLE_S = 1.0
QEMU_MAX_BANDWIDTH = 10 << 30
QEMU_PORT = 47000

GUEST_CFG = """\
name    = "{name}"
type    = "pvh"
memory  = {memory}
vcpus   = 1
kernel  = "debian/vmlinuz"
ramdisk = "debian/initrd.img"
extra   = "console=hvc0 quiet loglevel=1"
accel   = "{accel}"
"""

REFERENCE = {
    "note": "published figures for Xen, NOT measured here (different hardware, workloads and "
            "a hardware-assisted hypervisor)",
    "clark_nsdi_2005": {
        "citation": "C. Clark, K. Fraser, S. Hand, J. G. Hansen, E. Jul, C. Limpach, I. Pratt, "
                    "A. Warfield: 'Live Migration of Virtual Machines', NSDI 2005",
        "downtime_ms": {"SPECweb99 web server": 210, "Quake 3 server": 60},
    },
    "xen_docs_downtime_ms": [60, 300],
}


def log(msg: str) -> None:
    print(f"[migrate-bench] {msg}", file=sys.stderr, flush=True)


def med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


def dirty_loop(mib: int, report: str) -> str:
    """Shell text: create /tmp/blk (1 MiB random) and rewrite /tmp/x in place forever;
    ``report`` is run after each pass with $n = the pass count."""
    return ("head -c 1048576 /dev/urandom > /tmp/blk; : > /tmp/x; n=0; while :; do i=0; "
            f"while [ $i -lt {mib} ]; do dd if=/tmp/blk of=/tmp/x bs=1M count=1 seek=$i "
            "conv=notrunc 2>/dev/null; i=$((i+1)); done; n=$((n+1)); " + report + "; done")


# ------------------------------------------------------------------------------------ pyxen


class PyxenGuest:
    """One guest on a HostPair, migrated back and forth through the pyxend API."""

    def __init__(self, pair, cfg: Path) -> None:  # type: ignore[no-untyped-def]
        self.pair = pair
        t0 = time.monotonic()
        self.name = pair.a.boot(cfg)
        self.host = pair.a
        self.boot_s = round(time.monotonic() - t0, 2)

    def other(self):  # type: ignore[no-untyped-def]
        return self.pair.b if self.host is self.pair.a else self.pair.a

    def sh(self, cmd: str, timeout: float = 60) -> str:
        return self.host.sh(self.name, cmd, timeout=timeout)

    def health(self) -> dict[str, int]:
        """The loop's pass count, and how often the guest's kernel logged an OOM kill or a
        late clocksource watchdog (its timer ran seconds late) since boot."""
        out = self.sh("echo PASSES=$(cat /tmp/passes 2>/dev/null || echo 0) "
                      "OOM=$(dmesg | grep -c 'Out of memory') "
                      "LATE=$(dmesg | grep -c 'Long readout interval')")
        m = re.findall(r"PASSES=(\d+) OOM=(\d+) LATE=(\d+)", out)
        if not m:
            raise RuntimeError(f"no pass count from the guest: {out[-300:]!r}")
        return dict(zip(("passes", "oom", "late"), map(int, m[-1])))

    def passes(self) -> int:
        return self.health()["passes"]

    def why(self) -> str:
        """After a failure: the guest kernel's OOM / late-timer lines, if the console
        answers (a shell killed by the OOM killer is respawned by the image's init)."""
        for _ in range(2):
            try:
                out = self.sh("dmesg | grep -E 'invoked oom-killer|Out of memory|Long readout"
                              "|rcu.*stall' | head -6", timeout=15)
                return "\n".join(ln for ln in out.splitlines()[1:-1] if ln.strip())[-1500:]
            except Exception:                              # noqa: BLE001 (best effort)
                time.sleep(2)
        return "(the guest console did not answer)"

    def migrate(self) -> dict[str, Any]:
        src, dst = self.host, self.other()
        t0 = time.monotonic()
        st, out = src.api("POST", f"/v1/domains/{self.name}/migrate", {"host": dst.address})
        wall = time.monotonic() - t0
        if st != 200 or not isinstance(out, dict) or out.get("phase") != "done":
            raise RuntimeError(f"migration {src.ns} -> {dst.ns} failed: HTTP {st}: {out}\n"
                               f"--- source pyxend log:\n{src.log('pyxend.log')}")
        self.host = dst
        out = dict(out)
        out["wall_ms"] = round(wall * 1000, 1)
        out["direction"] = f"{src.address} -> {dst.address}"
        return out

    def destroy(self) -> None:
        self.host.px("destroy", self.name, check=False)


def pyxen_run(raw: dict[str, Any]) -> dict[str, Any]:
    steps = raw.get("pause_steps_ms") or {}
    target = steps.get("target-restore", 0.0) + steps.get("target-resume", 0.0)
    pages, total_s = raw["pages_sent"], raw["total_ms"] / 1000
    return {"pause_ms": raw["pause_ms"], "total_ms": raw["total_ms"],
            "stream_pause_ms": round(raw["pause_ms"] - target, 2),
            "bytes_sent": raw["bytes_sent"], "mib_sent": round(raw["bytes_sent"] / 2**20, 2),
            "pages_sent": pages, "zero_pages": raw.get("zero_pages"),
            "pages_per_s": round(pages / total_s) if total_s > 0 else None,
            "rounds": raw["rounds"], "dirty_history": raw.get("dirty_history"),
            "final_pages": (raw.get("dirty_history") or [None])[-1],
            "pause_steps_ms": steps, "wall_ms": raw.get("wall_ms"),
            "direction": raw.get("direction")}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def col(k: str) -> list[float]:
        return [r[k] for r in runs if r.get(k) is not None]
    out: dict[str, Any] = {
        "pause_ms": med(col("pause_ms")), "pause_ms_min": min(col("pause_ms"), default=None),
        "pause_ms_max": max(col("pause_ms"), default=None),
        "total_ms": med(col("total_ms")),
        "mib_sent": med(col("mib_sent")), "bytes_sent": med(col("bytes_sent")),
        "pages_per_s": med(col("pages_per_s")), "rounds": med(col("rounds")),
    }
    for k in ("stream_pause_ms", "final_pages", "qemu_downtime_ms", "guest_dirty_mib_s"):
        if col(k):
            out[k] = med(col(k))
    if any("guest_oom_kills" in r for r in runs):
        out["runs_with_guest_oom"] = sum(1 for r in runs if r.get("guest_oom_kills"))
        out["runs_with_late_guest_timer"] = sum(1 for r in runs if r.get("guest_late_timer"))
    steps: dict[str, list[float]] = {}
    for r in runs:
        for k, v in (r.get("pause_steps_ms") or {}).items():
            steps.setdefault(k, []).append(v)
    if steps:
        out["pause_steps_ms"] = {k: med(v) for k, v in steps.items()}
    return out


def bench_pyxen(pair, size: int, args, tmp: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Both workloads on one guest of ``size`` MiB. A workload that fails is recorded with
    ``error`` (and what the guest kernel said); the rest of this size is then skipped."""
    cfg = tmp / f"mb{size}.cfg"
    cfg.write_text(GUEST_CFG.format(name=f"mb{size}", memory=size, accel=args.accel))
    log(f"pyxen: booting a {size} MiB guest")
    g = PyxenGuest(pair, cfg)
    res: dict[str, Any] = {"boot_s": g.boot_s}
    try:
        time.sleep(2)                            # let the boot's last writes settle
        for workload in ("idle", "dirty"):
            case: dict[str, Any] = {}
            runs: list[dict[str, Any]] = []
            res[workload] = case
            try:
                if workload == "dirty":
                    loop = dirty_loop(args.dirty_mib, "echo $n > /tmp/passes")
                    g.sh(f"({loop}) </dev/null >/dev/null 2>&1 & :")
                    time.sleep(1)
                    p0, t0 = g.passes(), time.monotonic()
                    time.sleep(2)
                    p1, t1 = g.passes(), time.monotonic()
                    case["guest_dirty_mib_s_before"] = round((p1 - p0) * args.dirty_mib /
                                                             (t1 - t0), 1)
                    if p1 <= p0:
                        raise RuntimeError("the dirtying loop does not run in the guest")
                for i in range(args.runs):
                    h0, t0 = (g.health(), time.monotonic()) if workload == "dirty" else ({}, 0.)
                    raw = g.migrate()
                    run = pyxen_run(raw)
                    runs.append(run)
                    if workload == "dirty":
                        h1, t1 = g.health(), time.monotonic()
                        run["guest_dirty_mib_s"] = round((h1["passes"] - h0["passes"]) *
                                                         args.dirty_mib / (t1 - t0), 1)
                        run["guest_oom_kills"] = h1["oom"] - h0["oom"]
                        run["guest_late_timer"] = h1["late"] - h0["late"]
                        if h1["passes"] <= h0["passes"]:
                            raise RuntimeError(f"the dirtying loop stopped after migration "
                                               f"{i + 1}")
                    elif "ALIVE=2" not in g.sh("echo ALIVE=$((1+1))"):
                        raise RuntimeError(f"guest does not answer after migration {i + 1}")
                    log(f"pyxen {size} MiB {workload} #{i + 1}: pause {run['pause_ms']} ms, "
                        f"total {run['total_ms']} ms, {run['mib_sent']} MiB, rounds "
                        f"{run['rounds']}, dirty {run['dirty_history']}")
                    time.sleep(SETTLE_S)
            except (RuntimeError, AssertionError, OSError) as e:
                case["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
                case["guest_kernel_said"] = g.why()
                log(f"pyxen {size} MiB {workload} failed after {len(runs)} migrations: "
                    f"{case['error'][:300]}\n{case['guest_kernel_said']}")
            case.update(summarize(runs))
            case["runs"] = runs
            if "error" in case:
                break
    finally:
        g.destroy()
    return res


# ------------------------------------------------------------------------------------ QEMU


class QMP:
    """A minimal QMP client on a unix socket; keeps the events it reads."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.s = socket.socket(socket.AF_UNIX)
            try:
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QMP socket {path} never appeared") from None
                time.sleep(0.05)
        self.s.settimeout(timeout)
        self.f = self.s.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self.f.readline()                                  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **arguments: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP closed during {name}")
            m = json.loads(line)
            if "return" in m:
                return m["return"]
            if "error" in m:
                raise RuntimeError(f"QMP {name}: {m['error']}")
            if "event" in m:
                self.events.append(m)

    def event_time(self, name: str) -> float | None:
        for e in reversed(self.events):
            if e["event"] == name:
                return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
        return None

    def close(self) -> None:
        try:
            self.s.close()
        except OSError:
            pass


class QemuGuest:
    """One QEMU TCG guest migrated back and forth between the pair's namespaces."""

    def __init__(self, pair, qemu: str, image, size: int, command: str, tag: str,  # type: ignore[no-untyped-def]
                 tmp: Path, procs: list[subprocess.Popen]) -> None:
        from pyxen.engine.tcg import _tsc_khz
        from pyxen.image.build import elf_kernel
        from pyxen.image.runspec import concat_initrd, make_overlay, new_nonce
        self.pair, self.qemu, self.size, self.tmp, self.procs = pair, qemu, size, tmp, procs
        self.dir = tmp / f"qemu{size}-{tag}"
        self.dir.mkdir()
        initrd = self.dir / "initrd"
        initrd.write_bytes(concat_initrd(image.initramfs.read_bytes(),
                                         make_overlay("run", command, new_nonce(), modules=[])))
        self.base = [qemu, "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", str(size),
                     "-smp", "1", "-display", "none", "-no-reboot", "-nodefaults",
                     "-kernel", str(elf_kernel(image)), "-initrd", str(initrd), "-append",
                     f"console=ttyS0 quiet loglevel=1 tsc_early_khz={_tsc_khz()}"]
        self.n = 0
        self.host = pair.a
        self.proc, self.qmp = self._start(pair.a, None)

    def _start(self, host, incoming: str | None):  # type: ignore[no-untyped-def]
        self.n += 1
        n = self.n
        argv = [*self.base, "-serial", f"file:{self.dir}/serial-{n}",
                "-qmp", f"unix:{self.dir}/qmp-{n},server=on,wait=off"]
        if incoming:
            argv += ["-incoming", incoming]
        proc = host.popen(*argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=open(self.dir / f"stderr-{n}", "wb"))
        self.procs.append(proc)
        try:
            qmp = QMP(f"{self.dir}/qmp-{n}")
        except Exception:
            raise RuntimeError(f"QEMU did not start: {self._stderr(n)}") from None
        self.serial_path = self.dir / f"serial-{n}"
        return proc, qmp

    def _stderr(self, n: int) -> str:
        try:
            return (self.dir / f"stderr-{n}").read_text(errors="replace")[-800:]
        except OSError:
            return ""

    def serial(self) -> str:
        try:
            return self.serial_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_serial(self, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.serial():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU guest never printed {what!r}: "
                                   f"{self.serial()[-800:]!r} {self._stderr(self.n)}")
            time.sleep(0.1)

    def passes(self) -> int:
        m = re.findall(r"P(\d+)\b", self.serial())
        return int(m[-1]) if m else 0

    def migrate(self) -> dict[str, Any]:
        src, dst = self.host, (self.pair.b if self.host is self.pair.a else self.pair.a)
        port = QEMU_PORT + self.n
        uri = f"tcp:{dst.address}:{port}"
        dproc, dqmp = self._start(dst, uri)
        sq = self.qmp
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": QEMU_MAX_BANDWIDTH})
        params = sq.cmd("query-migrate-parameters")
        sq.events.clear()
        t0 = time.monotonic()
        sq.cmd("migrate", uri=uri)
        deadline = t0 + 120
        while True:
            q = sq.cmd("query-migrate")
            if q.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                sq.cmd("migrate_cancel")
                raise RuntimeError(f"QEMU migration did not finish in 120 s: {q}")
            time.sleep(0.01)
        wall = time.monotonic() - t0
        if q["status"] != "completed":
            raise RuntimeError(f"QEMU migration {q['status']}: {q.get('error-desc', q)}")
        deadline = time.monotonic() + 30
        while not dqmp.cmd("query-status").get("running"):
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU target never ran the guest")
            time.sleep(0.005)
        stop, resume = sq.event_time("STOP"), dqmp.event_time("RESUME")
        sq.cmd("quit")
        sq.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc, self.qmp, self.host = dproc, dqmp, dst
        ram = q.get("ram", {})
        pages = ram.get("normal", 0) + ram.get("duplicate", 0)
        total_ms = q.get("total-time")
        return {"pause_ms": round((resume - stop) * 1000, 2) if stop and resume else None,
                "qemu_downtime_ms": q.get("downtime"), "total_ms": total_ms,
                "bytes_sent": ram.get("transferred"),
                "mib_sent": round(ram.get("transferred", 0) / 2**20, 2),
                "pages_sent": pages, "zero_pages": ram.get("duplicate"),
                "pages_per_s": round(pages / (total_ms / 1000)) if total_ms else None,
                "rounds": ram.get("dirty-sync-count"),
                "downtime_bytes": ram.get("downtime-bytes"),
                "setup_ms": q.get("setup-time"), "wall_ms": round(wall * 1000, 1),
                "direction": f"{src.address} -> {dst.address}",
                "params": {k: params.get(k) for k in ("downtime-limit", "max-bandwidth")}}

    def close(self) -> None:
        try:
            self.qmp.cmd("quit")
        except Exception:                                  # noqa: BLE001 (clean-up)
            pass
        self.qmp.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench_qemu(pair, qemu: str, image, size: int, args, tmp: Path,  # type: ignore[no-untyped-def]
               procs: list[subprocess.Popen]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for workload in ("idle", "dirty"):
        if workload == "idle":
            command = "echo GUEST-READY; while :; do sleep 1; done"
        else:
            command = ("echo GUEST-READY; " +
                       dirty_loop(args.dirty_mib, "echo P$n"))
        log(f"qemu: booting a {size} MiB guest ({workload})")
        t0 = time.monotonic()
        g = QemuGuest(pair, qemu, image, size, command, workload, tmp, procs)
        case: dict[str, Any] = {}
        try:
            g.wait_serial("GUEST-READY")
            case["boot_s"] = round(time.monotonic() - t0, 2)
            time.sleep(2)
            if workload == "dirty":
                p0, t0 = g.passes(), time.monotonic()
                time.sleep(2)
                p1, t1 = g.passes(), time.monotonic()
                if p1 <= p0:
                    raise RuntimeError("the dirtying loop does not run in the QEMU guest")
                case["guest_dirty_mib_s_before"] = round((p1 - p0) * args.dirty_mib /
                                                         (t1 - t0), 1)
            runs = []
            for i in range(args.runs):
                run = g.migrate()
                if workload == "dirty":          # the loop goes on in the target's console
                    deadline = time.monotonic() + 30
                    while g.passes() == 0 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    if g.passes() == 0:
                        raise RuntimeError(f"QEMU guest's loop silent after migration {i}")
                log(f"qemu {size} MiB {workload} #{i + 1}: pause {run['pause_ms']} ms "
                    f"(QEMU downtime {run['qemu_downtime_ms']} ms), total {run['total_ms']} "
                    f"ms, {run['mib_sent']} MiB, rounds {run['rounds']}")
                runs.append(run)
                time.sleep(SETTLE_S)
            case.update(summarize(runs))
            case["runs"] = runs
        finally:
            g.close()
        res[workload] = case
    return res


# ------------------------------------------------------------------------------------ main


def host_facts(accel: str) -> dict[str, Any]:
    facts: dict[str, Any] = {"cpus": os.cpu_count(), "engine": accel,
                             "kernel": platform.release(), "python": platform.python_version()}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                facts["os"] = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return facts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="migrations per case (default 5)")
    ap.add_argument("--sizes", default="96,256", help="guest sizes in MiB (default 96,256)")
    ap.add_argument("--dirty-mib", type=int, default=16,
                    help="MiB the dirtying guest keeps rewriting (default 16)")
    ap.add_argument("--accel", default="tcg", help="pyxen's engine (default tcg)")
    ap.add_argument("--no-peer", action="store_true", help="skip the QEMU peer")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if os.geteuid() != 0 or not shutil.which("ip"):
        print(json.dumps({"error": "bench/migrate.py needs root and iproute2 "
                                   "(network namespaces)"}))
        return 1

    from pyxen.image.build import ensure_image, publish
    from pyxen.testing.hostpair import HostPair
    from qemu_peer import qemu_binary

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with &
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    image = ensure_image()
    publish(image)
    qemu = None if args.no_peer else qemu_binary()
    errors: dict[str, str] = {}
    if not args.no_peer and not qemu:
        errors["peer"] = "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    started = time.monotonic()
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "runs": args.runs, "sizes_mib": sizes,
        "dirty_mib": args.dirty_mib, "guest_kernel": image.release, "vcpus": 1}
    cases: dict[str, Any] = {}
    peer: dict[str, Any] = {}
    procs: list[subprocess.Popen] = []
    tmpdir = tempfile.mkdtemp(prefix="pyxen-migbench-")
    pair = HostPair(f"{tmpdir}/pair", tag=f"mg{os.getpid()}")
    try:
        log(f"setting up hosts {pair.ns[0]} / {pair.ns[1]}")
        pair.setup()
        for size in sizes:
            try:
                r = bench_pyxen(pair, size, args, Path(tmpdir))
            except (RuntimeError, AssertionError, OSError, subprocess.SubprocessError) as e:
                errors[f"pyxen_{size}"] = f"{type(e).__name__}: {str(e)[:2000]}"
                log(f"pyxen {size} MiB failed: {errors[f'pyxen_{size}'][:500]}")
                r = {}
            for w in ("idle", "dirty"):
                if w in r:
                    cases[f"{w}_{size}"] = {"size_mib": size, "workload": w, **r[w]}
                    if "error" in r[w]:
                        errors[f"pyxen_{w}_{size}"] = r[w]["error"]
            if "idle" in r:
                cases[f"idle_{size}"]["boot_s"] = r["boot_s"]
            if qemu:
                try:
                    q = bench_qemu(pair, qemu, image, size, args, Path(tmpdir), procs)
                    for w in ("idle", "dirty"):
                        peer[f"{w}_{size}"] = {"size_mib": size, "workload": w, **q[w]}
                except RuntimeError as e:
                    errors[f"peer_{size}"] = str(e)
                    log(f"QEMU peer failed: {e}")
    except KeyboardInterrupt as e:
        errors["interrupted"] = str(e) or "Ctrl-C"
    except Exception as e:                                # noqa: BLE001 (reported)
        errors["pyxen"] = f"{type(e).__name__}: {e}"
        log(f"failed: {errors['pyxen'][:3000]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        pair.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    idle_256 = cases.get("idle_256", {}).get("pause_ms")
    result.update({
        "pause_ms": idle_256,
        "goal": {"what": "median pause of the idle 256 MiB guest <= 50 ms",
                 "pause_ms_max": GOAL_PAUSE_MS,
                 "met": idle_256 is not None and idle_256 <= GOAL_PAUSE_MS},
        "cases": cases,
        "peer": ({"name": "QEMU live migration between two qemu-system-x86_64 -M microvm "
                          "-accel tcg processes (same kernel and initramfs)",
                  "version": subprocess.run([qemu, "--version"], capture_output=True,
                                            text=True).stdout.splitlines()[0],
                  "pause_ms_is": "QMP STOP (source) to RESUME (target) event time stamps",
                  "qemu_downtime_ms_is": "QEMU's query-migrate 'downtime' (source side)",
                  "settings": {"downtime-limit_ms": 300, "max-bandwidth": QEMU_MAX_BANDWIDTH},
                  "cases": peer} if qemu else None),
        "reference": REFERENCE,
        "host": host_facts(args.accel),
        "elapsed_s": round(time.monotonic() - started, 1),
        "errors": errors,
    })
    print(json.dumps(result, indent=2))
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
