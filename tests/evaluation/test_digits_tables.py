"""tools/digits_tables.py, the script behind the README's digits results: a small configuration
of it (1 epoch on 128 training digits, 1 thread) rerun gives exactly the numbers recorded in
tools/digits_tables_small.json, for both models (skipped where the recorded conditions, torch
version and CPU instruction set among them, are not this machine's)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "tools" / "digits_tables_small.json"


@pytest.mark.slow
def test_a_rerun_of_the_small_configuration_reproduces_its_numbers(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    conditions = json.loads(RECORDED.read_text())["conditions"]
    command = [sys.executable, str(ROOT / "tools" / "digits_tables.py"), "--out",
               str(tmp_path / "tables"), "--epochs", str(conditions["epochs"]),
               "--train-subset", str(conditions["train_subset"]), "--seed",
               str(conditions["seed"]), "--threads", str(conditions["threads"]),
               "--check", str(RECORDED)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all 24 numbers equal" in done.stdout
    assert (tmp_path / "tables" / "table.txt").read_text().count("\n") == 14
