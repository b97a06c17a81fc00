"""Interleaved A/B runs of one benchmark: Mayak at a base commit against the working tree.

This machine's speed drifts by up to 2× within an hour, so two versions are compared only in runs
taken back to back, alternating, several times. This script does that: it checks the base commit out
into a temporary worktree, then runs the given benchmark command ``--pairs`` times for each side,
alternating (base first in odd pairs, the working tree first in even ones), with ``PYTHONPATH``
pointing the benchmark and the server it starts at the side's ``src``. The benchmark scripts
themselves (``bench/``) are the working tree's on both sides, so only Mayak differs.

Each run writes its JSON (``--json-out`` is appended to the command); the summary prints, per side,
the figures found in it: throughput, the server main thread's CPU per event or message (the figure
that moves least from run to run) and turn latency percentiles.

    python bench/ab.py --base HEAD~1 --pairs 3 -- bench/webchat.py --conversations 1000 --rate 2000
    python bench/ab.py --base a05376d -- bench/ingest_http.py --backend sqlite --events 300000 --skip-raw
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# JSON keys worth comparing (matched at any depth; the path is printed with the value)
FIGURES = (
    "processed_events_per_s",
    "events_per_s",
    "sustained_turns_per_s",
    "server_main_thread_us_per_event",
    "server_main_thread_us_per_msg",
    "main_thread_us_per_event",
    "commit_wait_us_per_event",
    "mayak_ingest_commit_seconds_sum",
    "p50",
    "p99",
)
LATENCY_PARENTS = ("turn_latency_ms", "request_latency_ms")  # p50/p99 only under these


def figures(data: Any, path: str = "") -> dict[str, float]:
    """The comparable figures in a benchmark's JSON, by dotted path."""
    found: dict[str, float] = {}
    if isinstance(data, list):  # e.g. ingest_http's runs, one per backend
        for i, item in enumerate(data):
            found |= figures(item, f"{path}.{i}" if path else str(i))
    elif isinstance(data, dict):
        for key, value in data.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(value, dict | list):
                found |= figures(value, here)
            elif key in FIGURES and isinstance(value, int | float) and not isinstance(value, bool):
                if key in ("p50", "p99") and path.rsplit(".", 1)[-1] not in LATENCY_PARENTS:
                    continue
                found[here] = float(value)
    return found


def run(side: str, src: Path, command: list[str], out: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])))
    print(f"--- {side}: {' '.join(command)}", flush=True)
    done = subprocess.run([sys.executable, *command, "--json-out", str(out)], cwd=ROOT, env=env, check=False)
    if done.returncode != 0 or not out.exists():
        print(f"    {side}: the run failed (exit {done.returncode})", flush=True)
        return {}
    found = figures(json.loads(out.read_text()))
    print("    " + "  ".join(f"{k}={v:,.1f}" for k, v in found.items()), flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark and its options")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark command after --")
    results: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="mayak-ab-") as tmp:
        worktree = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--force", str(worktree), args.base],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            sides = {"base": worktree / "src", "head": ROOT / "src"}
            for pair in range(args.pairs):
                order = ["base", "head"] if pair % 2 == 0 else ["head", "base"]
                for side in order:
                    out = Path(tmp) / f"{side}-{pair}.json"
                    results[side].append(run(side, sides[side], command, out))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    keys = sorted({k for side in results.values() for run_ in side for k in run_})
    print(f"\n== {args.pairs} interleaved pairs, base {args.base} against the working tree")
    for key in keys:
        for side in ("base", "head"):
            values = [r[key] for r in results[side] if key in r]
            print(f"  {key:<55} {side:<4}  " + " / ".join(f"{v:,.1f}" for v in values))


if __name__ == "__main__":
    main()
