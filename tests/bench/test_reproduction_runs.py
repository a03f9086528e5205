"""benchmarks/reproduction.py --runs copies run folders under the listed names into the committed
report: a folder of another command (a smoke run named like a 50-task run) must not replace a row."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import reproduction  # noqa: E402


def test_the_committed_runs_are_those_of_their_commands():
    for name, *_ in reproduction.RUNS:
        stored = reproduction.STORE / f"{name}.json"
        if stored.exists():
            assert reproduction.command_mismatch(name, json.loads(stored.read_text())) == "", name


def test_a_run_of_another_command_is_named_as_such():
    res = json.loads((reproduction.STORE / "fc50.json").read_text())
    smoke = {**res, "config": {**res["config"], "tasks": 2, "iters": 3}, "data": "embedded"}
    why = reproduction.command_mismatch("fc50", smoke)
    assert "tasks 2 (the command gives 50)" in why and "iters 3" in why and "data 'embedded'" in why
