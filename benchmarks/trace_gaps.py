"""Where the GPU idles in a profiled step, and which host code it waits for (issue 21).

Reads a Chrome trace as torch.profiler exports it (``prof.export_chrome_trace``; ``.json`` or
``.json.gz``) and finds the gaps between the GPU's busy intervals (kernels, copies, memsets on
any stream). Each gap is charged to the code that launched the GPU work ending it: the launch
call (``cuda_runtime``/``cuda_driver`` event with the same ``correlation``), the innermost
``cpu_op`` around it, and the innermost Python frame in the project's own files. A gap whose
ending work was launched only after the gap began is the host falling behind; one whose work was
already queued is the GPU waiting on something else (an event, a copy from the host).

    python benchmarks/trace_gaps.py TRACE.json.gz [--steps 2] [--min-us 20]

``benchmarks/train_step.py --profile DIR`` writes the trace beside its kernel tables and appends
this summary to them.
"""

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
OWN_FILES = ("furlib/", "benchmarks/", "notebooks/")  # frames that name the project's code


def load(path) -> list:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def busy_intervals(events: list) -> list:
    """Merged (start, end, first event) intervals of GPU work, in trace microseconds."""
    work = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    merged = []
    for e in work:
        start, end = e["ts"], e["ts"] + e.get("dur", 0)
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end, e])
    return merged


def enclosing(spans: list, starts: list, t: float, keep=lambda span: True):
    """The innermost (latest-starting) span of ``spans`` (sorted by start, ``starts`` their
    starts) that contains ``t`` and that ``keep`` accepts; None if there is none."""
    i = bisect.bisect_right(starts, t)
    for s in reversed(spans[max(0, i - 5000):i]):  # spans around t start before it (a compiled graph: thousands)
        if t <= s["ts"] + s.get("dur", 0) and keep(s):
            return s
    return None


class Host:
    """The host-side events of one trace, indexed for lookups by time and correlation."""

    def __init__(self, events: list):
        self.launch = {e["args"]["correlation"]: e for e in events
                       if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
        by_tid = defaultdict(lambda: {"cpu_op": [], "python_function": []})
        for e in events:
            if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function"):
                by_tid[e.get("tid")][e["cat"]].append(e)
        self.spans = {tid: {cat: sorted(v, key=lambda e: e["ts"]) for cat, v in cats.items()}
                      for tid, cats in by_tid.items()}
        self.starts = {tid: {cat: [e["ts"] for e in v] for cat, v in cats.items()} for tid, cats in self.spans.items()}

    def context(self, launch: dict) -> tuple[str, str]:
        """(innermost cpu_op, innermost project frame) around a launch call."""
        tid, t = launch.get("tid"), launch["ts"]
        if tid not in self.spans:
            return "?", "?"
        op = enclosing(self.spans[tid]["cpu_op"], self.starts[tid]["cpu_op"], t)
        frame = enclosing(self.spans[tid]["python_function"], self.starts[tid]["python_function"], t,
                          lambda f: any(k in f["name"] for k in OWN_FILES))
        return (op["name"] if op else "?"), (frame["name"] if frame else "?")


def gaps(events: list, min_us: float = 20.0, busy: list | None = None) -> list:
    """Every GPU idle gap of at least ``min_us``: dicts with its length, the work after it, whether
    the host launched that work late, and the launching cpu_op and project frame. ``busy``: the
    events' ``busy_intervals``, where the caller has them already."""
    host, out = Host(events), []
    busy = busy_intervals(events) if busy is None else busy
    for (_, prev_end, _), (start, _, first) in zip(busy, busy[1:]):
        if start - prev_end < min_us:
            continue
        launch = host.launch.get(first.get("args", {}).get("correlation"))
        op, frame = host.context(launch) if launch else ("?", "?")
        late = launch is not None and launch["ts"] + launch.get("dur", 0) >= prev_end
        out.append({"us": start - prev_end, "next": first["name"], "host_late": late, "cpu_op": op, "frame": frame})
    return out


def summary(events: list, steps: int = 1, min_us: float = 20.0, top: int = 15) -> str:
    """Idle time per step, by project frame (host late or not), and the largest gaps."""
    busy = busy_intervals(events)
    found = gaps(events, min_us, busy)
    span = busy[-1][1] - busy[0][0] if busy else 0.0
    idle = sum(g["us"] for g in found)
    lines = [f"GPU idle gaps of >= {min_us:.0f} us: {idle / steps / 1e3:.1f} ms a step in "
             f"{len(found) / steps:.0f} gaps "
             f"({span / steps / 1e3:.1f} ms from the first to the last GPU work, per step); "
             f"host late for {sum(g['us'] for g in found if g['host_late']) / steps / 1e3:.1f} ms of it", "",
             "By the project frame that launched the work after the gap (ms a step, gaps a step, host late):"]
    groups = defaultdict(lambda: [0.0, 0, 0])
    for g in found:
        k = groups[g["frame"]]
        k[0] += g["us"]
        k[1] += 1
        k[2] += g["host_late"]
    for frame, (us, n, late) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {us / steps / 1e3:7.2f} ms  {n / steps:5.1f}  {late / max(n, 1):4.0%}  {frame}")
    lines += ["", f"The {top} largest gaps (us, host late, cpu_op, frame, next GPU work):"]
    for g in sorted(found, key=lambda g: -g["us"])[:top]:
        lines.append(f"  {g['us']:8.0f}  {'late' if g['host_late'] else 'queued'}  {g['cpu_op'][:40]}  "
                     f"{g['frame'][:70]}  {g['next'][:50]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="profiled steps in the trace (the summary is per step)")
    ap.add_argument("--min-us", type=float, default=20.0, help="shorter gaps are not counted")
    args = ap.parse_args()
    print(summary(load(args.trace), args.steps, args.min_us))


if __name__ == "__main__":
    main()
