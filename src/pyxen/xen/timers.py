"""Xen timers of one domain: per-vCPU singleshot and periodic timers raising VIRQ_TIMER.

One thread per domain sleeps until the earliest deadline. Deadlines are Xen system time (ns)
and are compared with :meth:`DomainClock.now_ns`, the same pvclock formula over the same TSC the
guest uses, so a timer never fires "early" from the guest's point of view.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from typing import Callable

from pyxen.core.clock import DomainClock


class Timers:
    """A deadline queue with a worker thread. ``fire(vcpu)`` runs on the worker thread."""

    def __init__(self, clock: DomainClock, fire: Callable[[int], None], name: str) -> None:
        self.clock = clock
        self.fire = fire
        self.singleshot: dict[int, int] = {}      # vcpu -> deadline ns
        self.periodic: dict[int, tuple[int, int]] = {}   # vcpu -> (next deadline, period)
        self._heap: list[tuple[int, int, str, int]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self._held = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-timers", daemon=True)
        self._thread.start()

    def set_singleshot(self, vcpu: int, deadline: int) -> None:
        """Arm ``vcpu``'s one-shot timer. A deadline already past fires on the caller's thread
        before this returns, as Xen raises it before the guest resumes."""
        if deadline <= self.clock.now_ns():
            with self._cv:
                self.singleshot.pop(vcpu, None)
            self.fire(vcpu)
            return
        with self._cv:
            self.singleshot[vcpu] = deadline
            heapq.heappush(self._heap, (deadline, next(self._seq), "s", vcpu))
            self._cv.notify()

    def stop_singleshot(self, vcpu: int) -> None:
        with self._cv:
            self.singleshot.pop(vcpu, None)

    def set_periodic(self, vcpu: int, period: int) -> None:
        with self._cv:
            first = self.clock.now_ns() + period
            self.periodic[vcpu] = (first, period)
            heapq.heappush(self._heap, (first, next(self._seq), "p", vcpu))
            self._cv.notify()

    def stop_periodic(self, vcpu: int) -> None:
        with self._cv:
            self.periodic.pop(vcpu, None)

    def hold(self, held: bool) -> None:
        """While held, due timers wait instead of firing (a save freezes the domain's event
        state); releasing fires what fell due meanwhile. Any thread."""
        with self._cv:
            self._held = held
            self._cv.notify()

    def save(self) -> dict:
        """Armed timers (deadlines in Xen system time, ns) as JSON-compatible data."""
        with self._cv:
            return {"singleshot": [[v, d] for v, d in self.singleshot.items()],
                    "periodic": [[v, n, p] for v, (n, p) in self.periodic.items()]}

    def load(self, st: dict, nvcpus: int) -> None:
        """Re-arm :meth:`save`'s timers (deadlines already past fire at once). ValueError
        for a bad entry."""
        try:
            single = [(int(v), int(d)) for v, d in st.get("singleshot", [])]
            periodic = [(int(v), int(n), int(p)) for v, n, p in st.get("periodic", [])]
        except (TypeError, ValueError):
            raise ValueError(f"timers: bad state {st!r}") from None
        for v, *_rest in single + periodic:
            if not 0 <= v < nvcpus:
                raise ValueError(f"timers: bad entry for vcpu {v}")
        with self._cv:
            for v, n, p in periodic:
                if p <= 0:
                    raise ValueError(f"timers: period {p} for vcpu {v}")
                self.periodic[v] = (n, p)
                heapq.heappush(self._heap, (n, next(self._seq), "p", v))
            self._cv.notify()
        for v, d in single:
            self.set_singleshot(v, d)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

    def _due(self, kind: str, vcpu: int, deadline: int) -> bool:
        """Is this heap entry still current (not cancelled or replaced)?"""
        if kind == "s":
            return self.singleshot.get(vcpu) == deadline
        p = self.periodic.get(vcpu)
        return p is not None and p[0] == deadline

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop:
                    while self._heap and not self._due(self._heap[0][2], self._heap[0][3],
                                                       self._heap[0][0]):
                        heapq.heappop(self._heap)
                    if not self._heap or self._held:
                        self._cv.wait()
                        continue
                    wait = self.clock.seconds_until(self._heap[0][0])
                    if wait <= 0:
                        break
                    self._cv.wait(wait)
                if self._stop:
                    return
                deadline, _, kind, vcpu = heapq.heappop(self._heap)
                if kind == "s":
                    del self.singleshot[vcpu]
                else:
                    period = self.periodic[vcpu][1]
                    nxt = deadline + period
                    now = self.clock.now_ns()
                    if nxt <= now:                 # missed ticks: skip ahead, as Xen does
                        nxt = now + period - (now - deadline) % period
                    self.periodic[vcpu] = (nxt, period)
                    heapq.heappush(self._heap, (nxt, next(self._seq), "p", vcpu))
            self.fire(vcpu)
