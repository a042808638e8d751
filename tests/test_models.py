"""Models people fine-tune: weight dtype and revision, LoRA on any architecture (merge parity), optimizer choice."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dpo_recipe.cli import main
from dpo_recipe.config import ConfigError, ModelConfig
from dpo_recipe.evaluate import dataset_name
from dpo_recipe.rundir import epoch_dirs, eval_file_name
from dpo_recipe.run import prepare_run
from dpo_recipe.synthetic import synthetic_rows

SHORT_RUN = ("data.num_pairs=60", "data.num_test_pairs=8", "training.num_epochs=1")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """A tiny Llama (GQA, RMSNorm, RoPE, SwiGLU) saved as a model directory with its tokenizer, as a hub model is.
    64 wide: bitsandbytes quantizes 4-bit weights in blocks of 64 (a 32-wide row cannot be split into them)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llama_run(tiny_llama_dir) -> tuple[str, ...]:
    return ("model.tiny=", "model.tokenizer=", f"model.name_or_path={tiny_llama_dir}")


def sequence_logps(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# model.dtype and model.revision


def test_bf16_weights_train_and_save_as_bf16(smoke_config, tiny_llama_dir, capsys):
    config = smoke_config(*llama_run(tiny_llama_dir), *SHORT_RUN, "model.dtype=bf16")
    run = prepare_run(config)
    assert {p.dtype for p in run.trainer.model.parameters()} == {torch.bfloat16}
    assert "weights bf16: master weights, gradients and optimizer state are bf16 too" in capsys.readouterr().out
    before = {name: p.detach().clone() for name, p in run.trainer.model.named_parameters()}
    run.trainer.train()
    saved = load_file(epoch_dirs(config.run_dir)[-1] / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}
    assert any(not torch.equal(before[name], p) for name, p in run.trainer.model.named_parameters())  # it trained


def test_fp32_is_the_cpu_default_and_the_plan_says_so(smoke_config, tiny_llama_dir, capsys):
    run = prepare_run(smoke_config(*llama_run(tiny_llama_dir), *SHORT_RUN))
    assert {p.dtype for p in run.trainer.model.parameters()} == {torch.float32}
    assert "; 1 process; weights fp32; model compiled: no\n" in capsys.readouterr().out


def test_revision_reaches_both_hub_loads(monkeypatch, tokenizer):
    from dpo_recipe import models

    seen = {}

    def model_from_pretrained(name, **kwargs):
        seen["model"] = (name, kwargs["revision"], kwargs["dtype"])
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=256))

    def tokenizer_from_pretrained(name, **kwargs):
        seen["tokenizer"] = (name, kwargs["revision"])
        return tokenizer

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    config = ModelConfig(name_or_path="org/model", revision="v1.2", dtype="fp16")
    models.load_tokenizer(config)
    models.build_model(config, tokenizer, seed=0, max_length=64)
    assert seen == {"model": ("org/model", "v1.2", torch.float16), "tokenizer": ("org/model", "v1.2")}


def test_revision_on_a_local_model_is_a_config_error(smoke_config, tiny_llama_dir):
    with pytest.raises(ConfigError, match="--set model.revision=main: model.revision applies to hub models only"):
        smoke_config(*llama_run(tiny_llama_dir), "model.revision=main")


# ---------------------------------------------------------------------------------------------------------------
# LoRA on any architecture


def test_all_linear_is_the_default_and_covers_gpt2_conv1d_and_llama_linear(tiny_gpt2, tiny_llama):
    from peft import get_peft_model

    from dpo_recipe.config import LoraConfig
    from dpo_recipe.models import peft_config_for

    expected = {"gpt2": {"c_attn", "c_proj", "c_fc"}, "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}
    for name, model in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        peft_config = peft_config_for(model, LoraConfig())
        assert peft_config.fan_in_fan_out == (name == "gpt2")  # GPT-2's Conv1D weights are stored transposed
        wrapped = get_peft_model(model, peft_config)
        adapted = {key.split(".")[-1] for key, module in wrapped.named_modules() if hasattr(module, "lora_A")}
        assert adapted == expected[name]


@pytest.mark.parametrize(
    "architecture, options",
    [
        ("gpt2", ("model.lora.use_dora=true",)),
        ("llama", ("model.lora.use_rslora=true", "model.lora.modules_to_save=[lm_head]")),
    ],
)
def test_lora_variants_train_and_merge_to_the_same_log_probs(architecture, options, smoke_config, tiny_llama_dir):
    model = llama_run(tiny_llama_dir) if architecture == "llama" else ()
    config = smoke_config(*model, *SHORT_RUN, "model.lora.r=4", "model.lora.dropout=0.0", *options)
    run = prepare_run(config)
    peft_config = run.trainer.model.peft_config["default"]
    assert (peft_config.use_dora, peft_config.use_rslora) == (config.model.lora.use_dora, config.model.lora.use_rslora)
    run.trainer.train()
    final = epoch_dirs(config.run_dir)[-1]
    adapter = load_file(final / "adapter_model.safetensors")
    if config.model.lora.use_dora:
        assert any("lora_magnitude_vector" in name for name in adapter)
    if config.model.lora.modules_to_save:
        assert any("lm_head" in name for name in adapter)  # the fully trained head is saved beside the adapter

    merged_dir = config.run_dir.parent / "merged"
    assert main(["merge", "--checkpoint", str(final), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    input_ids = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 11, 7, 300]])
    adapter_logps = sequence_logps(run.trainer.model.eval(), input_ids)
    with run.trainer.model.disable_adapter():
        base_logps = sequence_logps(run.trainer.model, input_ids)
    assert (adapter_logps - base_logps).abs().max() > 1e-3  # the adapter changed the model
    assert (sequence_logps(merged, input_ids) - adapter_logps).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Optimizers and their arguments


def built_optimizer(config, model, steps: int = 20):
    """The optimizer and scheduler transformers builds from the recipe's arguments for this config."""
    from transformers import Trainer

    from dpo_recipe.run import dpo_arguments

    arguments = dpo_arguments(config, world_size=1, precision="fp32")
    arguments.eval_strategy = "no"  # no evaluation set: only the optimizer and the schedule are built here
    trainer = Trainer(model=model, args=arguments)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    return trainer.optimizer, trainer.lr_scheduler


def test_adam_arguments_warmup_steps_and_scheduler_kwargs_reach_the_optimizer(smoke_config, tiny_gpt2):
    config = smoke_config(
        "training.optim=adamw_torch", "training.adam_beta1=0.8", "training.adam_beta2=0.95", "training.adam_epsilon=1e-6",
        "training.warmup_steps=4", "training.lr_scheduler=cosine_with_restarts", "training.lr_scheduler_kwargs={num_cycles: 2}",
        "training.learning_rate=1e-3",
    )
    optimizer, scheduler = built_optimizer(config, tiny_gpt2)
    assert type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__ == "AdamW"
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.8, 0.95), 1e-6)
    rates = []
    for _ in range(20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])  # 4 warmup steps, then the peak
    # Two cosine cycles over the 16 steps after warmup: back at the peak at step 4 + 8.
    assert rates[11] < 1e-4 and rates[12] == pytest.approx(1e-3)


def test_adafactor_is_transformers_adafactor(smoke_config, tiny_gpt2):
    from transformers.optimization import Adafactor

    optimizer, _ = built_optimizer(smoke_config("training.optim=adafactor"), tiny_gpt2)
    assert isinstance(getattr(optimizer, "optimizer", optimizer), Adafactor)


def test_an_optimizer_without_its_package_names_the_extra(smoke_config, monkeypatch):
    from dpo_recipe import run

    real_find_spec = run.importlib.util.find_spec
    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real_find_spec(name))
    config = smoke_config("training.optim=paged_adamw_8bit")
    with pytest.raises(ConfigError) as error:
        run.dpo_arguments(config, world_size=1, precision="fp32")
    assert str(error.value) == (
        "--set training.optim=paged_adamw_8bit: training.optim paged_adamw_8bit needs bitsandbytes, which is not "
        'installed: pip install -e ".[qlora]"'
    )


def test_eight_bit_adamw_trains_through_bitsandbytes(smoke_config, tiny_gpt2):
    bitsandbytes = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the optional extra .[qlora]")
    optimizer, _ = built_optimizer(smoke_config("training.optim=adamw_8bit"), tiny_gpt2)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    assert isinstance(optimizer, bitsandbytes.optim.optimizer.Optimizer8bit)
    before = [p.detach().clone() for p in tiny_gpt2.parameters()]
    tiny_gpt2.train()
    tiny_gpt2(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]]), labels=torch.tensor([[1, 2, 3, 4, 5, 6]])).loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_gpt2.parameters()))
    # Moments of a large tensor are held in 8 bits (transformers keeps embeddings' in 32).
    assert optimizer.state[tiny_gpt2.transformer.h[0].mlp.c_fc.weight]["state1"].dtype == torch.uint8


# ---------------------------------------------------------------------------------------------------------------
# QLoRA (bitsandbytes, the optional extra .[qlora]; its CPU backend runs here)


def test_qlora_trains_an_adapter_on_a_4bit_base_then_merges_and_evaluates(smoke_config, tiny_llama_dir, tmp_path):
    bitsandbytes = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the optional extra .[qlora]")
    config = smoke_config(*llama_run(tiny_llama_dir), *SHORT_RUN, "model.quantization.bits=4", "model.lora.r=8")
    run = prepare_run(config)
    base = run.trainer.model.get_base_model()
    assert any(isinstance(module, bitsandbytes.nn.Linear4bit) for module in base.modules())
    assert run.trainer.ref_model is None  # the reference is the quantized base with the adapter off
    assert all("lora_" in name for name, p in run.trainer.model.named_parameters() if p.requires_grad)
    run.trainer.train()
    final = epoch_dirs(config.run_dir)[-1]
    assert any(value.abs().max() > 0 for name, value in load_file(final / "adapter_model.safetensors").items() if "lora_B" in name)

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(final), "--out", str(merged_dir)]) == 0
    merged = load_file(merged_dir / "model.safetensors")
    assert {tensor.dtype for tensor in merged.values()} == {torch.float32}  # de-quantized into model.dtype (fp32 here)
    assert not any("absmax" in name or "quant" in name for name in merged)
    # The merged model computes what the adapter on the quantized base computed, up to the bf16 adapter weights.
    input_ids = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 11, 7, 300]])
    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert (sequence_logps(merged_model, input_ids) - sequence_logps(run.trainer.model.eval(), input_ids)).abs().max() < 2e-2
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows("test", 8)))
    assert main(["eval", str(merged_dir), "--reference", str(tiny_llama_dir), "--data", str(pairs)]) == 0
    assert json.loads((merged_dir / eval_file_name(dataset_name(str(pairs)))).read_text())["pairs"] == 8


def test_8bit_quantization_loads_int8_layers(tiny_llama_dir, tokenizer):
    bitsandbytes = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the optional extra .[qlora]")
    from dpo_recipe.config import LoraConfig, QuantizationConfig
    from dpo_recipe.models import build_model

    config = ModelConfig(name_or_path=str(tiny_llama_dir), lora=LoraConfig(), quantization=QuantizationConfig(bits=8))
    model = build_model(config, tokenizer, seed=0, max_length=64)
    layers = [module for module in model.modules() if isinstance(module, bitsandbytes.nn.Linear8bitLt)]
    assert layers and all(layer.weight.dtype == torch.int8 for layer in layers)
    assert not any(p.requires_grad for p in model.parameters())  # the quantized base is frozen


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("model.quantization.bits=4",), "--set model.quantization.bits=4: model.quantization trains a LoRA adapter on a frozen quantized base: add model.lora"),
        (("model.quantization.bits=3", "model.lora.r=8"), "--set model.quantization.bits=3: model.quantization.bits must be one of 4, 8 (got 3)"),
        (("model.quantization.quant_type=int4", "model.lora.r=8"), "model.quantization.quant_type must be one of nf4, fp4 (got 'int4')"),
    ],
)
def test_quantization_config_errors_are_one_line(overrides, message, smoke_config, tiny_llama_dir):
    with pytest.raises(ConfigError, match=re.escape(message)):
        smoke_config(*llama_run(tiny_llama_dir), *overrides)


def test_quantization_of_a_tiny_model_or_without_bitsandbytes_is_one_line(smoke_config, tiny_llama_dir, tokenizer, monkeypatch):
    with pytest.raises(ConfigError, match="set model.name_or_path .* instead of model.tiny"):
        smoke_config("model.quantization.bits=4", "model.lora.r=8")
    from dpo_recipe import models

    config = smoke_config(*llama_run(tiny_llama_dir), "model.quantization.bits=4", "model.lora.r=8")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real_find_spec(name))
    with pytest.raises(ConfigError, match=re.escape('model.quantization needs bitsandbytes, which is not installed: pip install -e ".[qlora]"')):
        models.build_model(config.model, tokenizer, seed=0, max_length=64)


# ---------------------------------------------------------------------------------------------------------------
# Example configs


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "configs" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_configs_resolve_with_print_config(path, capsys):
    from dpo_recipe.config_loader import load_config

    assert main(["print-config", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    config = load_config(path)
    assert f"run_name: {config.run_name}" in printed and config.run_name == path.stem
    if "qlora" in path.stem:
        assert config.model.quantization.bits == 4 and config.model.lora is not None
    elif "lora" in path.stem:
        assert config.model.lora.target_modules == "all-linear" and config.model.quantization is None
    else:
        assert config.model.lora is None and config.data.format == "hh-rlhf-chat"


def test_there_are_the_three_documented_examples():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert len(EXAMPLES) == 3
    for path in EXAMPLES:
        assert f"configs/examples/{path.name}" in readme


# ---------------------------------------------------------------------------------------------------------------
# Multi-machine launch


def test_two_machines_of_one_process_train_like_one_process(tmp_path):
    """recipes/accelerate_configs/multi_node.yaml with 2 "machines" on this host (gloo on CPU), as on a cluster."""
    import os
    import socket
    import subprocess
    import sys

    from test_train import single_process_validation

    from dpo_recipe.rundir import read_metrics

    repo = Path(__file__).resolve().parents[1]
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "multinode"

    def machine(rank: int) -> subprocess.Popen:
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(repo / "recipes" / "accelerate_configs" / "multi_node.yaml"),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--mixed_precision", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            str(repo / "scripts" / "train.py"), "--config", str(repo / "configs" / "smoke.yaml"),
            "--set", f"training.output_dir={out}", "--set", f"training.reference_cache_dir={tmp_path / 'cache'}",
            "--set", "training.num_epochs=1",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        log = open(tmp_path / f"machine{rank}.log", "w")
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=repo)

    machines = [machine(0), machine(1)]
    try:
        codes = [process.wait(timeout=600) for process in machines]
    finally:
        for process in machines:
            if process.poll() is None:
                process.kill()
    logs = [(tmp_path / f"machine{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "batch: 2 process(es) x micro-batch 8 x accumulation 1 = effective batch 16" in logs[0]
    run_dir = out / "smoke"
    (record,) = read_metrics(run_dir)
    assert record["train"]["pairs"] == 192 and record["val"]["pairs"] == 48
    expected = single_process_validation(run_dir, run_dir / "epoch-1")
    for key, value in expected.items():
        assert record["val"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
