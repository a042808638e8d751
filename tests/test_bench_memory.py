"""The memory benchmark counts what a training step holds: exact state per parameter in closed form, a fake-tensor
count that matches the real run, quantized storage, and its command end to end at a tiny size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_recipe import bench_memory as m
from dpo_recipe import bench_memory_report as report

REPO = Path(__file__).resolve().parents[1]
SHAPE = "tiny-test"
BATCH = m.Batch(pairs=2, prompt=16, response=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return m.save_tiny_model(SHAPE, tmp_path_factory.mktemp("memory"))


def run(setting: str, model_dir: Path, fake: bool = False, checkpointing: bool = False) -> dict:
    return m.measure(m.SETTINGS[setting], SHAPE, BATCH, checkpointing=checkpointing, autocast=False,
                     optim="adamw_torch", fake=fake, model_dir=model_dir)


def linear_shapes() -> list[tuple[int, int]]:
    """(in, out) of every linear layer LoRA all-linear adapts in the test shape."""
    s = m.TINY_SHAPES[SHAPE]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    h, kv, inner = s["hidden_size"], s["num_key_value_heads"] * head_dim, s["intermediate_size"]
    per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, inner), (h, inner), (inner, h)]
    return per_layer * s["num_hidden_layers"]


@pytest.mark.parametrize("setting, width", [("full_fp32", 4), ("full_bf16", 2)])
def test_full_fine_tune_holds_weights_gradients_and_two_adam_moments_per_parameter(model_dir, setting, width):
    """fp32: 4 + 4 + 8 = 16 bytes per parameter; bf16 weights: 2 + 2 + 4 = 8 (AdamW's moments take the weights'
    dtype, each parameter tensor adds a 4-byte step count)."""
    result = run(setting, model_dir)
    n, state = result["parameters"], result["state"]
    tensors = 9 * m.TINY_SHAPES[SHAPE]["num_hidden_layers"] + 2  # 7 linear + 2 norms a layer, embedding, final norm
    assert state["gradients"] == width * n
    assert state["optimizer"] == 2 * width * n + 4 * tensors
    assert state["weights"] == width * n + state["buffers"] and state["buffers"] <= 128  # RoPE's two frequency tables
    total = state["weights"] + state["gradients"] + state["optimizer"]
    assert total / n == pytest.approx(4 * width, rel=0.01)


def test_lora_state_is_the_frozen_base_plus_fp32_adapters(model_dir):
    result = run("lora_bf16", model_dir)
    n, state = result["parameters"], result["state"]
    adapter = sum(16 * (fan_in + fan_out) for fan_in, fan_out in linear_shapes())  # r=16: A (r x in), B (out x r)
    assert state["trainable"] == 4 * adapter  # PEFT keeps adapters fp32 on a bf16 base
    assert state["gradients"] == 4 * adapter
    assert state["optimizer"] == 8 * adapter + 4 * 2 * len(linear_shapes())
    assert state["weights"] == 2 * n + 4 * adapter + state["buffers"]


def test_fake_tensors_count_what_the_real_step_allocates(model_dir):
    """The method behind the real-shape table: the same step on fake tensors gives the same state, and a peak within
    a few percent of the real run's, with and without gradient checkpointing."""
    for checkpointing in (False, True):
        real = run("full_fp32", model_dir, checkpointing=checkpointing)
        fake = run("full_fp32", model_dir, fake=True, checkpointing=checkpointing)
        assert fake["state"] == real["state"]
        assert fake["tracked"]["peak"] == pytest.approx(real["tracked"]["peak"], rel=0.05)
        assert real["tracked"]["activations"] > 0
        assert real["tracked"]["peak"] > real["state"]["weights"] + real["state"]["optimizer"]
    plain = run("full_fp32", model_dir, fake=True)
    checkpointed = run("full_fp32", model_dir, fake=True, checkpointing=True)
    assert checkpointed["tracked"]["activations"] < plain["tracked"]["activations"]


def test_qlora_stores_about_half_a_byte_per_quantized_weight(model_dir):
    """NF4 with double quantization: 4 bits a weight, an 8-bit constant per block of 64 weights and an fp32 constant
    per 256 blocks, plus lookup tables per layer; charged so, the fake-tensor emulation holds what the real load does."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra: pip install -e '.[qlora]'")
    real, fake = run("qlora", model_dir), run("qlora", model_dir, fake=True)
    per_weight, per_layer = report.quantized_storage(real)
    assert per_weight == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=0.02)
    assert real["quantization"]["layers"] == real["quantized_layers"] == len(linear_shapes())
    assert 0 < per_layer < 4096
    assert report.with_quantized_storage(fake, (per_weight, per_layer))["state"]["weights"] == pytest.approx(real["state"]["weights"], abs=1)
    assert real["state"]["trainable"] == 2 * sum(16 * (i + o) for i, o in linear_shapes())  # bf16 adapters, as TRL casts them
    assert real["state"]["weights"] < run("lora_bf16", model_dir)["state"]["weights"]


def test_the_results_section_replaces_only_itself(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# Benchmark\n\n## Results\n\nspeed\n\n## Memory per setting (issue 21)\n\nold\n\n## Later\n\nkept\n")
    report.replace_section(path, report.RESULTS_HEADING, ["new"])
    assert path.read_text() == "# Benchmark\n\n## Results\n\nspeed\n\n## Memory per setting (issue 21)\n\nnew\n\n## Later\n\nkept\n"
    report.replace_section(tmp_path / "fresh.md", report.RESULTS_HEADING, ["first"])
    assert (tmp_path / "fresh.md").read_text() == "## Memory per setting (issue 21)\n\nfirst\n"


def test_the_command_runs_at_a_tiny_size(tmp_path):
    """`make bench-memory` at test size: the measured table, in its section of an existing results file."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra: pip install -e '.[qlora]'")
    output = tmp_path / "results.md"
    output.write_text("# Benchmark\n\n## Results\n\nkept\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_memory.py"), "--tiny", SHAPE, "--real", "--settings", "qlora",
         "--pairs", "1", "--prompt", "8", "--response", "8", "--cache", str(tmp_path / "cache"), "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = output.read_text()
    assert text.startswith("# Benchmark\n\n## Results\n\nkept\n\n## Memory per setting (issue 21)")
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(f"| {SHAPE}")]
    assert [row[1] for row in rows] == ["qlora"]
    assert float(rows[0][3]) < 4  # weights, bytes per parameter: a 4-bit base under fp32 embeddings and adapters
    assert f"QLoRA storage, measured on {SHAPE}: 0.51" in text
