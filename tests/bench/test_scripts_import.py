"""Every script in benchmarks/ imports and answers --help: a moved helper or a renamed function
breaks a benchmark that runs only by hand, and users meet it first (as splitimagenet_cpu.py's
import of the fake-ImageNet writer did)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py")  # the scripts, not the pytest-benchmark suite
                 if p.name != "conftest.py" and not p.name.startswith("test_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_answers_help(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "usage:" in proc.stdout
