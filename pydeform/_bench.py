"""``python -m pydeform bench``: time every op on every backend usable here beside its peer.

The cases, their inputs, the peers and the timing helpers are those of
:mod:`pydeform.benchmark_cases` (shared with the asv suite). On the CPU each pydeform call and
its peer are timed in alternating blocks in this process (wall-clock medians); on the GPU each
implementation is timed with CUDA events after warm-up, cycling through several input sets.
Ratios are peer time / pydeform time: above 1, pydeform is faster. For the iterative ops (the
level sets) the notes also give the kernels the CuPy backend launches per iteration.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from importlib import metadata
from typing import NamedTuple, Optional

from . import benchmark_cases as bc

#: Alternating rounds (CPU) and CUDA-event repeats (GPU) per measurement, full and --quick.
CPU_ROUNDS = {False: 5, True: 2}
GPU_REPEATS = {False: 50, True: 10}
PEER = "peer"


class Measurement(NamedTuple):
    """The median time of one implementation of one case, dtype and pass."""

    case: str  # Case.id, e.g. "roi_align/cpu/7x7-sampling2"
    op: str
    device: str  # "cpu" or "gpu"
    workload: str
    dtype: str
    timed: str  # "forward" or "forward+backward"
    implementation: str  # a pydeform backend (numba-cpu, cupy, numba-cuda) or "peer" (named in peer)
    median_ms: Optional[float]  # None: it failed (see error)
    peer: Optional[str]  # what the case's peer is (None: no peer)
    error: Optional[str] = None


class Report(NamedTuple):
    measurements: list
    notes: list  # peers that cannot run here, devices skipped: one line each

    @property
    def failed(self) -> list:
        """Measurements of pydeform (not of a peer) that raised."""
        return [m for m in self.measurements if m.median_ms is None and m.implementation != PEER]


class _Progress:
    """A text progress bar on ``stream``: redrawn in place on a terminal, one line per update otherwise."""

    WIDTH = 30

    def __init__(self, total: int, stream):
        self.total, self.stream = total, stream
        self.redraw = getattr(stream, "isatty", lambda: False)()

    def show(self, done: int, label: str) -> None:
        """Draw ``done`` of ``total`` finished, ``label`` saying what runs now."""
        filled = self.WIDTH * done // max(self.total, 1)
        bar = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} {label}"
        if self.redraw:
            self.stream.write(f"\r\033[K{bar}" + ("\n" if done == self.total else ""))
        else:
            self.stream.write(bar + "\n")
        self.stream.flush()


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _timed_passes(case) -> list:
    return ["forward", "forward+backward"] if case.backward else ["forward"]


def _pick(calls, timed):
    return calls.forward if timed == "forward" else calls.forward_backward


def _cpu_measurements(case, dtype: str, rounds: int, notes: list) -> list:
    """pydeform on the Numba CPU backend and the case's peer, alternating, per pass."""
    host = bc.host_inputs(case)
    ours = bc.pydeform_calls(case, bc.device_inputs(host, dtype))
    try:
        peer = bc.peer_calls(case, host, dtype)
    except bc.PeerUnavailable as error:
        peer = None
        if case.peer is not None:
            notes.append(f"peer of {case.id} ({case.peer}) not run: {error}")
    results = []
    for timed in _timed_passes(case):
        functions = {"numba-cpu": _pick(ours, timed)}
        if peer is not None and _pick(peer, timed) is not None:
            functions[PEER] = _pick(peer, timed)
        working = {}
        for name, function in functions.items():
            try:
                function()  # compiles pydeform's kernels, builds the peer's session
            except Exception as error:  # reported in the table; the others go on
                results.append((timed, name, None, _error_text(error)))
            else:
                working[name] = function
        if working:
            medians = bc.alternating_medians(list(working.values()), rounds=rounds)
            results += [(timed, name, seconds * 1e3, None) for name, seconds in zip(working, medians)]
    return results


def _gpu_time(cupy, calls_per_set: list, timed: str, repeats: int):
    """Median CUDA-event milliseconds, cycling through the input sets; (ms, error)."""
    functions = [_pick(calls, timed) for calls in calls_per_set]
    try:
        return bc.cuda_median_ms(cupy, lambda index: functions[index % len(functions)](), repeats=repeats), None
    except Exception as error:
        return None, _error_text(error)


def _gpu_measurements(case, dtype: str, backends: list, repeats: int, notes: list) -> list:
    """Each GPU backend usable here and the case's peer, one after the other, per pass."""
    import cupy

    hosts = [bc.host_inputs(case, seed) for seed in range(bc.INPUT_SETS)]
    implementations = {}
    for backend in backends:
        if dtype in backend.dtypes:
            implementations[backend.name] = [
                bc.pydeform_calls(case, bc.device_inputs(host, dtype, cupy), backend.option) for host in hosts
            ]
    try:
        implementations[PEER] = [bc.peer_calls(case, host, dtype) for host in hosts]
    except bc.PeerUnavailable as error:
        if case.peer is not None:
            notes.append(f"peer of {case.id} ({case.peer}) not run: {error}")
    results = []
    for timed in _timed_passes(case):
        for name, calls_per_set in implementations.items():
            if _pick(calls_per_set[0], timed) is not None:
                results.append((timed, name, *_gpu_time(cupy, calls_per_set, timed, repeats)))
    for backend in backends:
        if case.launches is not None and backend.name == "cupy" and dtype in backend.dtypes:
            notes.append(_launch_note(case, dtype, backend, bc.device_inputs(hosts[0], dtype, cupy)))
    return results


def _launch_note(case, dtype: str, backend, arrays) -> str:
    """The note recording the kernel launches per iteration of an iterative op's case."""
    try:
        count = case.launches(case, arrays, backend.option)
    except Exception as error:
        return f"launches per iteration of {case.id} {dtype} ({backend.name}) not counted: {_error_text(error)}"
    return f"launches per iteration of {case.id} {dtype} ({backend.name}): {count}"


def _jobs(op: Optional[str], device: Optional[str], quick: bool, backends: list, notes: list) -> list:
    """(case, dtype, device backends) for every case this machine can run."""
    gpu_backends = [backend for backend in backends if backend.on_gpu]
    jobs = []
    for where in ("cpu", "gpu"):
        if device not in (None, where):
            continue
        if where == "gpu" and not gpu_backends:
            notes.append("GPU cases not run: no GPU backend is usable here (see python -m pydeform info)")
            continue
        usable = gpu_backends if where == "gpu" else [b for b in backends if not b.on_gpu]
        for case in bc.cases(op, where, quick):
            jobs += [(case, dtype, usable) for dtype in case.dtypes
                     if any(dtype in backend.dtypes for backend in usable)]
    return jobs


def run_benchmarks(op=None, device=None, quick=False, rounds=None, backends=None, progress=None) -> Report:
    """Measure every case of :func:`pydeform.benchmark_cases.cases` (``op``, ``device``,
    ``quick`` select them) on ``backends`` (default: all usable here) and beside the peers."""
    from .selftest import discover_backends

    if backends is None:
        backends, _ = discover_backends()
    notes: list = []
    jobs = _jobs(op, device, quick, backends, notes)
    bar = _Progress(len(jobs), sys.stderr if progress is None else progress)
    measurements = []
    for done, (case, dtype, usable) in enumerate(jobs):
        bar.show(done, f"timing {case.id} {dtype}")
        if case.device == "cpu":
            results = _cpu_measurements(case, dtype, rounds or CPU_ROUNDS[quick], notes)
        else:
            results = _gpu_measurements(case, dtype, usable, rounds or GPU_REPEATS[quick], notes)
        measurements += [
            Measurement(case.id, case.op, case.device, case.workload, dtype, timed, name, ms, case.peer, error)
            for timed, name, ms, error in results
        ]
    bar.show(len(jobs), "done")
    return Report(measurements, notes)


# --- output ----------------------------------------------------------------------------------


def _groups(measurements) -> dict:
    """(case, dtype, pass) -> {implementation: measurement}, in measurement order."""
    groups: dict = {}
    for m in measurements:
        groups.setdefault((m.case, m.dtype, m.timed), {})[m.implementation] = m
    return groups


def speedups(measurements) -> dict:
    """(case, dtype, pass, backend) -> peer median / backend median, where both were measured."""
    ratios = {}
    for key, group in _groups(measurements).items():
        peer = group.get(PEER)
        for name, m in group.items():
            if name != PEER and peer is not None and peer.median_ms and m.median_ms:
                ratios[(*key, name)] = peer.median_ms / m.median_ms
    return ratios


TABLE_COLUMNS = ("case", "dtype", "pass", "backend", "median ms", "peer ms", "peer / pydeform")


def table_rows(report: Report) -> list:
    ratios = speedups(report.measurements)
    rows = []
    for (case, dtype, timed), group in _groups(report.measurements).items():
        peer = group.get(PEER)
        for name, m in group.items():
            if name == PEER:
                continue
            ratio = ratios.get((case, dtype, timed, name))
            rows.append((
                case, dtype, timed, name,
                "FAILED" if m.median_ms is None else f"{m.median_ms:.3f}",
                "-" if peer is None or peer.median_ms is None else f"{peer.median_ms:.3f}",
                "-" if ratio is None else f"{ratio:.2f}",
            ))
    return rows


def print_report(report: Report, out) -> None:
    rows = [TABLE_COLUMNS] + table_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)
    peers = {m.case: m.peer for m in report.measurements if m.implementation == PEER}
    for case, peer in peers.items():
        print(f"peer of {case}: {peer}", file=out)
    for note in report.notes:
        print(note, file=out)
    for m in report.measurements:
        if m.error is not None:
            print(f"{'FAILED' if m.implementation != PEER else 'peer failed'}: {m.case} {m.dtype} "
                  f"{m.timed} {m.implementation}: {m.error}", file=out)


def installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def report_json(report: Report, argv) -> dict:
    """The report as a JSON-ready dict: the machine and versions, then one entry per measurement
    (``speedup`` = peer median / this median, null where either is missing)."""
    from . import __version__

    ratios = speedups(report.measurements)
    return {
        "command": ["python", "-m", "pydeform", *argv],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "versions": {"pydeform": __version__, **{name: installed_version(name) for name in
                     ("numpy", "numba", "cupy-cuda12x", "cupy-cuda13x", "torch", "torchvision", "onnxruntime")}},
        "measurements": [
            {**m._asdict(), "speedup": ratios.get((m.case, m.dtype, m.timed, m.implementation))}
            for m in report.measurements
        ],
        "notes": report.notes,
    }


def _series(m: Measurement) -> str:
    """The chart's name for a measurement's implementation: a pydeform backend, or the peer's
    own name (each peer is a series of its own)."""
    return m.peer if m.implementation == PEER and m.peer else m.implementation


def chart(report: Report):
    """A horizontal bar chart of the medians (log scale), one group of bars per case, dtype and
    pass: each pydeform backend and the peer, labelled by name in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(key, {_series(m): m for m in group.values()}) for key, group in _groups(report.measurements).items()
              if any(m.median_ms for m in group.values())]
    names = list(dict.fromkeys(_series(m) for m in report.measurements))
    height = 0.8 / max(len(names), 1)
    figure, axes = plt.subplots(figsize=(10, 1.0 + 0.35 * len(names) * max(len(groups), 1)))
    for index, name in enumerate(names):
        bars = [(row, group[name].median_ms) for row, (_, group) in enumerate(groups)
                if name in group and group[name].median_ms]
        if bars:
            axes.barh([row + index * height for row, _ in bars], [ms for _, ms in bars], height, label=name)
    axes.set_yticks([row + 0.4 - height / 2 for row in range(len(groups))])
    axes.set_yticklabels([f"{case} {dtype} {timed}" for (case, dtype, timed), _ in groups], fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    shortest = min((m.median_ms for m in report.measurements if m.median_ms), default=1.0)
    axes.set_xlim(left=shortest / 3)  # log-scale bars start at the axis: leave every bar a length
    axes.set_xlabel("median time (ms, log scale; shorter is faster)")
    axes.set_title("python -m pydeform bench")
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return figure


def plot(report: Report, path) -> None:
    """Draw :func:`chart` to the PNG file ``path``."""
    import matplotlib.pyplot as plt

    figure = chart(report)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(op=None, device=None, quick=False, rounds=None, json_path=None, png_path=None, argv=()) -> int:
    """Run, print the table, write the JSON and PNG asked for; exit status 1 if a pydeform
    measurement failed."""
    if png_path is not None:
        try:
            import matplotlib  # noqa: F401  (checked before minutes of timing, not after)
        except ImportError:
            print("bench --png needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
    report = run_benchmarks(op, device, quick, rounds)
    print_report(report, sys.stdout)
    if json_path is not None:
        with open(json_path, "w") as file:
            json.dump(report_json(report, argv), file, indent=1)
        print(f"wrote {json_path}")
    if png_path is not None:
        plot(report, png_path)
        print(f"wrote {png_path}")
    return 1 if report.failed else 0
