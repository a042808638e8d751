"""Secrets in the environment never reach a run directory, a config dump or the logs, even when pasted into a config."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, SMOKE_CONFIG

SECRETS = {"WANDB_API_KEY": "wandb-secret-6f1d2c9e", "HF_TOKEN": "hf_secretTOKEN4b7a90d3"}


def test_secrets_stay_out_of_run_files_config_dumps_and_logs(tmp_path):
    env = {**os.environ, **SECRETS}
    # A key pasted into the config by mistake: the dumps must show it redacted, not in the clear.
    overrides = [
        f"training.output_dir={tmp_path / 'checkpoints'}",
        f"training.reference_cache_dir={tmp_path / 'cache'}",
        f"logging.wandb_project={SECRETS['WANDB_API_KEY']}",
        "training.num_epochs=1",
        "data.num_pairs=16",
        "data.num_test_pairs=4",
        "data.max_length=64",
    ]
    arguments = [arg for override in overrides for arg in ("--set", override)]
    outputs = []
    for command in (["train"], ["print-config"], ["train", "--print-config", "--set", "run_name=other"]):
        result = subprocess.run(
            [sys.executable, "-m", "dpo_recipe", *command, "--config", str(SMOKE_CONFIG), *arguments],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs += [result.stdout, result.stderr]

    run_dir = tmp_path / "checkpoints" / "smoke"
    assert (run_dir / "epoch-1" / "model.safetensors").is_file()
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert len(files) > 10
    for name, secret in SECRETS.items():
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{name} leaked into {path}"
        for text in outputs:
            assert secret not in text, f"{name} leaked into the output"
    assert "wandb_project: <WANDB_API_KEY redacted>" in (run_dir / "config.yaml").read_text()
    assert "wandb_project: <WANDB_API_KEY redacted>" in outputs[2]  # print-config
