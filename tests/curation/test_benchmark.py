"""``benchmarks/curation.py`` on a small pool: the real script runs the IVF-PQ path (``--flat-max``
below N) end to end and prints every stage; the injected near-copies come back as the duplicate
pairs. Timings are never asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_runs_the_ivf_path_and_finds_the_injected_pairs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "curation.py"), "--n", "8000", "--dim", "128", "--seeds", "100",
         "--flat-max", "2000", "--threads", "1"],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    lines = {line.split()[0].rstrip(":"): line for line in done.stdout.splitlines()[1:]}
    assert set(lines) == {"generate", "index", "dedup", "retrieve", "total"}
    assert "'kind': 'ivfpq'" in lines["index"] and "'nlist': 89" in lines["index"]
    dedup = re.search(r"(\d+) of (\d+) injected \(recall ([\d.]+)\), (\d+) others", lines["dedup"])
    assert dedup is not None and int(dedup[2]) == 80 and float(dedup[3]) >= 0.95 and dedup[4] == "0"
    retrieval = [line for line in done.stdout.splitlines() if line.strip().startswith("retrieve")]
    assert len(retrieval) == 2 and "IVF lists as clusters" in retrieval[1]
    first = float(re.search(r"seed's source first ([\d.]+)", retrieval[0])[1])  # type: ignore[index]
    assert first >= 0.9
    assert re.search(r"total\s+[\d.]+ s\s+peak RSS\s+[\d.]+ GiB", lines["total"])
