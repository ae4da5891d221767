"""``benchmarks/shard_reads.py`` runs and reports both ways of reading shards in a random order: by
byte range a sample's JPEG, whole shards many times that."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "shard_reads.py"


def test_the_shard_reads_benchmark_prints_both_ways(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--shards", "3", "--per-shard", "20", "--samples", "30",
                           "--uri", str(tmp_path / "shards")], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("(")[1].split(")")[0]: line.split()[-4:] for line in done.stdout.splitlines()
            if line.startswith(("by byte range", "whole shards"))}
    now, before = rows["now"], rows["before"]
    assert 20 < float(now[2]) < 200  # kB a sample: one JPEG
    assert float(before[2]) > 5 * float(now[2])  # a whole shard (20 JPEGs) for most samples
    assert sorted(p.name for p in (tmp_path / "shards").iterdir())[:2] == ["shard-00000.tar",
                                                                          "shard-00000.tar.index.json"]
