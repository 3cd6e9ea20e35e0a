"""Topology probe: native (cffi) reader vs the pure-Python twin, on the same trees.

    python -m benchmarks.topology [--reps 41] [--tree PATH ...]

Why this exists: the C walk is only worth its build complexity if it is clearly faster on
big hosts; this measures it. Runs are interleaved (native, python, native, ...) so drift in
page cache or CPU frequency hits both sides alike, and medians of the repetitions are
reported. The last line is one JSON object for CI trend tracking: ``native_ms``,
``python_ms`` and ``speedup`` (python/native) for the Kunpeng 920 tree, the biggest one, plus
per-tree figures under ``trees``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cna_agent.host import topology
from cna_agent.host.topology import native_available, probe_topology

REPO = Path(__file__).resolve().parent.parent
KUNPENG = REPO / "tests" / "fixtures" / "sysfs" / "kunpeng920-2s"


def _ensure_native() -> bool:
    """Build the extension in place when missing, so the comparison is never silently one-sided."""
    if native_available():
        return True
    subprocess.run([sys.executable, str(REPO / "native" / "build_native.py")],
                   cwd=REPO, capture_output=True, timeout=300, check=False)
    topology._native_ok = None
    return native_available()


def _time_ms(root: str, use_native: bool) -> float:
    start = time.perf_counter()
    probe_topology(root, use_native=use_native)
    return (time.perf_counter() - start) * 1000.0


def measure(root: str, reps: int) -> dict[str, float]:
    """Median wall time of probe_topology(root) per reader, interleaved runs after a warm-up."""
    if probe_topology(root, use_native=True) != probe_topology(root, use_native=False) and root != "/":
        raise SystemExit(f"native and python disagree on {root}; fix that before timing")
    native: list[float] = []
    python: list[float] = []
    for i in range(reps):
        order = (True, False) if i % 2 == 0 else (False, True)
        for use_native in order:
            (native if use_native else python).append(_time_ms(root, use_native))
    n_ms, p_ms = statistics.median(native), statistics.median(python)
    return {"native_ms": round(n_ms, 3), "python_ms": round(p_ms, 3), "speedup": round(p_ms / n_ms, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=41)
    parser.add_argument("--tree", action="append", help="extra roots to time (default: Kunpeng tree and /)")
    args = parser.parse_args(argv)
    if not _ensure_native():
        print(json.dumps({"native_ms": None, "python_ms": None, "speedup": None,
                          "error": "cna_agent._native could not be built"}))
        return 1

    roots = [("kunpeng920-2s", str(KUNPENG)), ("live /", "/")]
    roots += [(t, t) for t in args.tree or []]
    results = {}
    for _ in range(2):  # warm page cache and imports for every root
        for _name, root in roots:
            probe_topology(root, use_native=True)
            probe_topology(root, use_native=False)
    for name, root in roots:
        results[name] = measure(root, args.reps)
        results[name]["cpus"] = len(probe_topology(root).cpus)

    print(f"probe_topology, median of {args.reps} interleaved runs ({platform.machine()}, "
          f"Python {platform.python_version()})")
    print(f"{'tree':<18}{'cpus':>6}{'native ms':>12}{'python ms':>12}{'speedup':>9}")
    for name, r in results.items():
        print(f"{name:<18}{r['cpus']:>6}{r['native_ms']:>12.3f}{r['python_ms']:>12.3f}{r['speedup']:>8.2f}x")
    head = results["kunpeng920-2s"]
    print(json.dumps({"tree": "kunpeng920-2s", "native_ms": head["native_ms"], "python_ms": head["python_ms"],
                      "speedup": head["speedup"], "reps": args.reps, "trees": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
