"""``benchmarks/decode.py`` runs and reports both ways of decoding: a JPEG too small for a reduced
scale decodes exactly as the full decode, a large one within a few levels of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "decode.py"


def test_decode_benchmark_prints_a_row_per_size() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "300x200", "1200x900", "--load-size", "64",
                           "--images", "2"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert set(rows) == {"300x200", "1200x900"}
    small, large = rows["300x200"], rows["1200x900"]
    assert float(small[-2]) == 0 and int(small[-1]) == 0  # 200 < 4 x 64: decoded in full either way
    assert 0 < float(large[-2]) < 2 and int(large[-1]) <= 16  # decoded at 1/4: close to the full decode
    assert all(float(value) > 0 for value in (*large[2:5], large[5].rstrip("x")))
