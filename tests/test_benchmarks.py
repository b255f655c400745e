"""The benchmark table's cheap groups run against the package as it is now, so that a
renamed function breaks a test here rather than CI's quick benchmark run at the very end."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.subprocess
def test_quick_data_and_reject_rows_are_measured(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick",
                           "--only", "data,reject", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["group"] for r in rows} == {"data loading", "reject malformed train.csv"}
    assert all(isinstance(r["value"], float) and r["value"] > 0 for r in rows), rows
