"""`make sweep` end to end at toy size, with configs whose run_name is not their file name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dpo_recipe.cli import main

from conftest import REPO, SMOKE_CONFIG


def sweep_config(directory: Path, file_name: str, run_name: str, beta: float) -> Path:
    path = directory / file_name
    path.write_text(
        f"base: {SMOKE_CONFIG}\nrun_name: {run_name}\nloss:\n  beta: {beta}\n"
        f"data:\n  num_pairs: 24\n  num_test_pairs: 4\n  max_length: 48\n"
        f"training:\n  num_epochs: 1\n  output_dir: {directory / 'runs'}\n  reference_cache_dir: {directory / 'cache'}\n"
    )
    return path


def test_print_config_names_the_run_directory_a_config_trains_into(tmp_path, capsys):
    config = sweep_config(tmp_path, "point.yaml", "not_the_file_name", 0.2)
    assert main(["print-config", "--run-dir", "--config", str(config), "--set", "run_name=other"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'runs' / 'other'}\n"


def test_make_sweep_trains_evaluates_and_reports_whatever_the_run_names(tmp_path):
    configs = [sweep_config(tmp_path, "a.yaml", "first", 0.1), sweep_config(tmp_path, "b.yaml", "second", 0.5)]
    report = tmp_path / "sweep.md"
    # Run under `make test` too, where the outer make's variables would make this one announce its directory.
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    venv = Path(sys.executable).parents[1]
    result = subprocess.run(
        ["make", "--no-print-directory", "sweep", f"VENV={venv}", f"LAUNCH={sys.executable}",
         f"SWEEP_CONFIGS={' '.join(map(str, configs))}", f"SWEEP_REPORT={report}",
         "ARGS=--set training.logging_steps=100"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for run in ("first", "second"):
        assert (tmp_path / "runs" / run / "best" / "eval_test.json").is_file()
    text = report.read_text()
    assert "| first " in text and "| second " in text
