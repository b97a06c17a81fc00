"""BANKING77 with the default NLU engine: train time, test accuracy, calibration, parse latency.

Trains :class:`mayak.nlu.LinearEngine` on the train split only (10,003 utterances, 77 intents), then
scores the test split (3,080). Latency is per single ``parse`` call, one utterance at a time, after a
warm-up, taken over every test utterance: first intent-only (``entities=False``), then with the
rule-based entity extraction that bots get by default. Each call is timed by the wall clock and by
its thread's CPU time: on a busy machine the wall-clock tail also holds time the process waited
for a CPU.

    python bench/nlu_banking77.py                  # data from /work/shared/data/banking77
    python bench/nlu_banking77.py --data DIR       # a directory with train.csv and test.csv (text,category)

Prints plain text lines, then one JSON line; also writes the JSON to ``bench/out/nlu_banking77.json``
(``--json-out ''`` for none).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, latency_summary_ms, machine_info, write_json

from mayak.nlu import Example, LinearEngine

DEFAULT_DATA = Path("/work/shared/data/banking77")
TARGET_ACCURACY = 0.90
TARGET_TRAIN_S = 15.0
TARGET_P99_MS = 1.0


def load(path: Path) -> list[Example]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [Example(row["text"], row["category"]) for row in csv.DictReader(fh)]


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = 10) -> float:
    total = len(confidences)
    error = 0.0
    for b in range(bins):
        members = [i for i, c in enumerate(confidences) if min(int(c * bins), bins - 1) == b]
        if members:
            mean_conf = sum(confidences[i] for i in members) / len(members)
            acc = sum(correct[i] for i in members) / len(members)
            error += len(members) / total * abs(mean_conf - acc)
    return error


def latency(engine: LinearEngine, texts: list[str], rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Wall-clock and CPU-time (this thread) percentiles of single parse calls, in ms.

    On a shared machine the wall-clock tail includes time the process was not scheduled; the CPU
    time of the same calls shows what the parse itself costs."""
    for text in texts[:300]:  # warm-up
        engine.parse(text)
    wall: list[float] = []
    cpu: list[float] = []
    clock, cpu_clock = time.perf_counter, time.thread_time
    for _ in range(rounds):
        for text in texts:
            c0 = cpu_clock()
            t0 = clock()
            engine.parse(text)
            t1 = clock()
            c1 = cpu_clock()
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
    wall_summary, cpu_summary = latency_summary_ms(wall), latency_summary_ms(cpu)
    wall_summary["calls"] = cpu_summary["calls"] = len(wall)
    return wall_summary, cpu_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the test set for latency")
    ap.add_argument("--json-out", default=str(OUT_DIR / "nlu_banking77.json"))
    args = ap.parse_args()

    train = load(args.data / "train.csv")
    test = load(args.data / "test.csv")

    engine = LinearEngine(entities=False)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    engine.train(train)
    train_s = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    train_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)

    confidences: list[float] = []
    correct: list[bool] = []
    for ex in test:
        best = engine.parse(ex.text).intent
        confidences.append(best.confidence if best else 0.0)
        correct.append(best is not None and best.name == ex.intent)
    accuracy = sum(correct) / len(correct)
    ece = expected_calibration_error(confidences, correct)
    kept = [ok for ok, c in zip(correct, confidences, strict=True) if c >= 0.5]
    coverage_05 = len(kept) / len(correct)
    accuracy_05 = sum(kept) / len(kept) if kept else float("nan")

    texts = [ex.text for ex in test]
    lat_intent, cpu_intent = latency(engine, texts, args.rounds)
    engine.entities = True
    lat_full, cpu_full = latency(engine, texts, args.rounds)
    loadavg = os.getloadavg()

    print(
        f"machine: {machine_info()}; load average at the end "
        f"{loadavg[0]:.2f} / {loadavg[1]:.2f} / {loadavg[2]:.2f}"
    )
    print(f"train: {len(train)} examples, {len(engine.intents)} intents; test: {len(test)} examples")
    print(f"train time: {train_s:.2f} s wall, {train_cpu_s:.2f} s CPU (target <= {TARGET_TRAIN_S:.0f} s)")
    print(f"test accuracy: {accuracy:.4f} (target >= {TARGET_ACCURACY:.2f})")
    print(
        f"calibration: ECE {ece:.4f}; confidence >= 0.5 on {coverage_05:.1%} of the test set, "
        f"accuracy there {accuracy_05:.4f}"
    )
    for label, lat, cpu in (("intent only", lat_intent, cpu_intent), ("with entities", lat_full, cpu_full)):
        print(
            f"parse latency ({label}, {lat['calls']:.0f} single calls): p50 {lat['p50'] * 1000:.0f} us, "
            f"p90 {lat['p90'] * 1000:.0f} us, p99 {lat['p99'] * 1000:.0f} us, max {lat['max'] * 1000:.0f} us "
            f"(target p99 <= {TARGET_P99_MS:.0f} ms); CPU time per call p50 {cpu['p50'] * 1000:.0f} us, "
            f"p99 {cpu['p99'] * 1000:.0f} us"
        )
    result: dict[str, Any] = {
        "benchmark": "nlu_banking77",
        "engine": "linear",
        "machine": machine_info(),
        "train_examples": len(train),
        "test_examples": len(test),
        "intents": len(engine.intents),
        "train_s": round(train_s, 3),
        "train_cpu_s": round(train_cpu_s, 3),
        "accuracy": round(accuracy, 4),
        "ece": round(ece, 4),
        "coverage_at_0_5": round(coverage_05, 4),
        "accuracy_at_0_5": round(accuracy_05, 4),
        "latency_ms_intent_only": {k: round(v, 4) for k, v in lat_intent.items()},
        "latency_ms_with_entities": {k: round(v, 4) for k, v in lat_full.items()},
        "cpu_ms_intent_only": {k: round(v, 4) for k, v in cpu_intent.items()},
        "cpu_ms_with_entities": {k: round(v, 4) for k, v in cpu_full.items()},
        "load_average": [round(x, 2) for x in loadavg],
        "targets_met": {
            "accuracy": accuracy >= TARGET_ACCURACY,
            "train_s": train_s <= TARGET_TRAIN_S,
            "p99_ms": lat_intent["p99"] <= TARGET_P99_MS and lat_full["p99"] <= TARGET_P99_MS,
        },
    }
    print(json.dumps(result))
    write_json(args.json_out, result)


if __name__ == "__main__":
    main()
