"""The benchmarks that write Mayak's tables themselves (not through its API) still match the schema:
each runs end to end at a tiny size. A schema change that one of them missed would otherwise show
only when someone next measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_lookup_benchmark_runs_and_every_answer_is_right(tmp_path: Path) -> None:
    out = tmp_path / "lookup.json"
    args = ["--customers", "300", "--requests", "60", "--warmup", "10", "--connections", "2"]
    args += ["--tmpdir", str(tmp_path), "--json-out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lookup.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["failures"] == 0, proc.stdout
    assert result["responses_checked"] > 0
