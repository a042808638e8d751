"""Configs: the sweep files resolve to the study's settings; overrides and the base chain work."""

from __future__ import annotations

import pytest
import yaml

from dpo_recipe.cli import main
from dpo_recipe.config import ConfigError
from dpo_recipe.config_loader import load_config
from dpo_recipe.run import batch_plan

from conftest import REPO

SWEEP = {
    "beta0.3.yaml": (0.3, 1e-4, 5),
    "beta0.3_lr1e-5.yaml": (0.3, 1e-5, 10),
    "beta0.5.yaml": (0.5, 1e-4, 5),
    "beta0.7.yaml": (0.7, 1e-5, 10),
}


@pytest.mark.parametrize("name", SWEEP)
def test_sweep_points_resolve_to_the_study(name):
    config = load_config(REPO / "configs" / name)
    beta, learning_rate, epochs = SWEEP[name]
    assert (config.loss.beta, config.training.learning_rate, config.training.num_epochs) == (beta, learning_rate, epochs)
    assert config.model.name_or_path == "gpt2" and config.data.source == "Anthropic/hh-rlhf"
    assert (config.data.num_pairs, config.data.num_test_pairs, config.data.max_length) == (3000, 500, 256)
    assert config.training.effective_batch_size == 16 and config.training.seed == 42
    assert config.run_dir.name == name.removesuffix(".yaml")


def test_print_config_shows_the_resolved_study_settings(capsys):
    assert main(["print-config", "--config", str(REPO / "configs" / "beta0.3.yaml")]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["loss"]["beta"] == 0.3
    assert resolved["training"]["learning_rate"] == 1e-4
    assert resolved["training"]["num_epochs"] == 5
    assert resolved["training"]["effective_batch_size"] == 16
    assert resolved["data"]["max_length"] == 256
    assert (resolved["data"]["num_pairs"], resolved["data"]["num_test_pairs"]) == (3000, 500)


def test_overrides_reach_any_key_and_are_typed():
    config = load_config(
        REPO / "configs" / "beta0.3.yaml",
        ["training.learning_rate=5e-5", "loss.type=ipo", "model.lora.r=8", "data.strict=true"],
    )
    assert config.training.learning_rate == 5e-5
    assert config.loss.type == "ipo"
    assert config.model.lora.r == 8 and config.model.lora.target_modules == "all-linear"
    assert config.data.strict is True
    with pytest.raises(ConfigError, match="training.num_epochs must be an integer"):
        load_config(REPO / "configs" / "beta0.3.yaml", ["training.num_epochs=many"])


def test_run_file_overrides_only_what_differs(tmp_path):
    (tmp_path / "base.yaml").write_text("loss: {beta: 0.2, type: dpo}\ntraining: {num_epochs: 7}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nrun_name: r\nloss: {beta: 0.9}\n")
    config = load_config(tmp_path / "run.yaml")
    assert (config.loss.beta, config.loss.type, config.training.num_epochs) == (0.9, "dpo", 7)


@pytest.mark.parametrize(
    "processes, per_device, expected",
    [(1, 16, (16, 1)), (2, 16, (8, 1)), (1, 4, (4, 4)), (4, 3, (2, 2)), (8, 16, (2, 1))],
)
def test_batch_plan_keeps_the_effective_batch(processes, per_device, expected):
    config = load_config(REPO / "configs" / "beta0.3.yaml", [f"training.per_device_batch_size={per_device}"])
    micro, accumulation = batch_plan(config, processes)
    assert (micro, accumulation) == expected
    assert micro * accumulation * processes == 16


def test_device_default_settings_stay_null_unless_the_attention_decides():
    """`null` means the device's default (resolved when the run starts); an attention implementation that cannot
    read the shared-prompt mask decides the layout on any device."""
    training = load_config(REPO / "configs" / "beta0.3.yaml").training
    assert (training.prompt_sharing, training.eval_batch_size, training.torch_compile, training.length_buckets) == (None,) * 4
    flash = load_config(REPO / "configs" / "beta0.3.yaml", ["model.attn_implementation=flash_attention_2"])
    assert flash.training.prompt_sharing is False
    assert load_config(REPO / "configs" / "beta0.3.yaml", ["training.length_buckets=4"]).training.length_buckets == 4


def test_describe_model_says_hub_id_local_directory_or_built_from_config(tmp_path):
    from dpo_recipe.config import ModelConfig
    from dpo_recipe.config import describe_model

    assert describe_model(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M")) == "HuggingFaceTB/SmolLM2-135M"
    assert describe_model(ModelConfig(name_or_path=str(tmp_path))) == f"local model {tmp_path.resolve()}"
    assert describe_model(ModelConfig(tiny={"n_layer": 2, "n_embd": 32})) == "GPT-2 from config, random init (n_layer=2, n_embd=32)"


def test_a_tiny_model_keeps_no_hub_name_and_a_named_tokenizer_stays_the_tokenizer(tmp_path):
    smoke = load_config(REPO / "configs" / "smoke.yaml")  # base.yaml says gpt2, smoke.yaml builds a tiny model
    assert smoke.model.name_or_path is None and smoke.model.tokenizer == "local-bpe"
    (tmp_path / "run.yaml").write_text("model: {name_or_path: gpt2, tiny: {n_layer: 1}}\n")
    tiny = load_config(tmp_path / "run.yaml")  # the name chose only the tokenizer
    assert tiny.model.name_or_path is None and tiny.model.tokenizer == "gpt2"
    with pytest.raises(ConfigError, match="^--set model.name_or_path=null: model.name_or_path must name a hub model"):
        load_config(REPO / "configs" / "beta0.3.yaml", ["model.name_or_path=null"])


def test_a_set_value_that_is_not_yaml_is_taken_as_text():
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    config = load_config(REPO / "configs" / "smoke.yaml", [f"data.chat_template={template}"])
    assert config.data.chat_template == template
    with pytest.raises(ConfigError, match=r"^--set training.num_epochs=\{%: training.num_epochs"):
        load_config(REPO / "configs" / "smoke.yaml", ["training.num_epochs={%"])
