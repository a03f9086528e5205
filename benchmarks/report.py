"""Write the benchmark report (JSON + PNG) to benchmarks/results/: ``python benchmarks/report.py [--quick]``
(the same as ``supsup-fast bench``)."""
import argparse
from pathlib import Path

from supsup_fast.bench import run_report

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backend", default="auto")
    a = p.parse_args()
    run_report(Path(a.out), quick=a.quick, backend=a.backend)
