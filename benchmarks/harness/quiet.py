"""``others_cpu``: the share of the machine that processes outside the benchmark used while it
measured.

    others_cpu = (busy CPU time of the whole machine − CPU time of the benchmark's own
                  process tree) / (wall time × cores)

Busy time is /proc/stat's non-idle ticks (user, nice, system, irq, softirq, steal); the tree's
time is this process's own, that of its reaped children (``os.times``) and that of every live
descendant (/proc/PID/stat, with the children each of them reaped). 0 means nothing else ran;
a measurement above :data:`QUIET` is not evidence. Unlike the 1-minute load average it does
not lag and does not count the benchmark's own previous worker.
"""

from __future__ import annotations

import dataclasses
import os
import time

#: Above this share a measurement is not evidence (refused unless explicitly allowed).
QUIET = 0.10
_TICK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """Machine busy seconds, own process tree's CPU seconds, monotonic wall seconds."""

    busy: float
    tree: float
    wall: float


def _machine_busy() -> float:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds incl. reaped children) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return int(fields[1]), (utime + stime + cutime + cstime) / _TICK


def _tree_cpu() -> float:
    own = os.getpid()
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents[int(entry)], cpu[int(entry)] = stat
    descendants, frontier = set(), {own}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - descendants
        descendants |= frontier
    times = os.times()
    return (times.user + times.system + times.children_user + times.children_system
            + sum(cpu[p] for p in descendants))


def sample() -> CpuSample:
    return CpuSample(_machine_busy(), _tree_cpu(), time.monotonic())


def others_cpu(start: CpuSample, end: CpuSample, cores: int | None = None) -> float:
    """The machine share others used between two samples (see the module docstring)."""
    cores = cores or os.cpu_count() or 1
    wall = max(end.wall - start.wall, 1e-9)
    others = (end.busy - start.busy) - (end.tree - start.tree)
    return max(0.0, others / (wall * cores))


class OthersCpu:
    """``with OthersCpu() as q: ...`` then ``q.value``: :func:`others_cpu` over the block."""

    value: float | None = None

    def __enter__(self) -> OthersCpu:
        self._start = sample()
        return self

    def __exit__(self, *exc) -> None:
        self.value = others_cpu(self._start, sample())


def refuse_if_loaded(prog: str, value: float, allow_load: bool) -> None:
    """Stop the benchmark ``prog`` in one line when others used more than :data:`QUIET` of the
    machine during a measurement, unless ``allow_load`` (its page then says so)."""
    if value > QUIET and not allow_load:
        raise SystemExit(f"{prog}: other processes used {value:.2f} of the machine (> {QUIET}) "
                         "while it measured; rerun on a quiet machine, or pass --allow-load "
                         "(the page will say so)")
