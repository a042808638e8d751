"""The loss hook against the DPO paper's formula, against TRL's own sigmoid loss, and at policy == reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from dpo_recipe.config import LOSS_TYPES, ConfigError, DataConfig
from dpo_recipe.config_loader import load_config
from dpo_recipe.data import load_text_splits, tokenize_pairs
from dpo_recipe.loss import BUILTIN_LOSSES, dpo_loss, ipo_loss, resolve_loss
from dpo_recipe.packing import PairCollator
from dpo_recipe.sources import DataReport
from dpo_recipe.trainer import RecipeDPOTrainer

from conftest import SMOKE_CONFIG


def paper_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """-log sigmoid(beta * margin), written independently as softplus(-x) = max(-x, 0) + log1p(exp(-|x|))."""
    x = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return max(-x, 0.0) + math.log1p(math.exp(-abs(x)))


CASES = [
    # policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta
    (-10.0, -12.0, -11.0, -11.5, 0.1),
    (-50.0, -20.0, -40.0, -30.0, 0.3),
    (-3.2, -3.2, -3.2, -3.2, 0.5),
    (-1.0, -9.0, -5.0, -5.0, 0.7),
    (0.0, -1e5, 0.0, 0.0, 0.1),  # beta * margin = +1e4
    (-1e5, 0.0, 0.0, 0.0, 0.1),  # beta * margin = -1e4
    (-2e4, 0.0, 0.0, 0.0, 0.5),  # beta * margin = -1e4
]


@pytest.mark.parametrize("case", CASES)
def test_dpo_loss_matches_paper_formula(case):
    *logps, beta = case
    tensors = [torch.tensor([value], dtype=torch.float64) for value in logps]
    losses, chosen_rewards, rejected_rewards = dpo_loss(*tensors, beta)
    assert torch.isfinite(losses).all()
    assert losses.item() == pytest.approx(paper_dpo_loss(*logps, beta), rel=1e-12, abs=1e-12)
    assert chosen_rewards.item() == pytest.approx(beta * (logps[0] - logps[2]))
    assert rejected_rewards.item() == pytest.approx(beta * (logps[1] - logps[3]))


def test_dpo_loss_is_stable_and_has_finite_gradients_at_extreme_margins():
    policy_chosen = torch.tensor([0.0, -1e5], requires_grad=True)
    policy_rejected = torch.tensor([-1e5, 0.0], requires_grad=True)
    zeros = torch.zeros(2)
    losses, _, _ = dpo_loss(policy_chosen, policy_rejected, zeros, zeros, beta=0.1)
    assert losses[0].item() == pytest.approx(0.0, abs=1e-30)
    assert losses[1].item() == pytest.approx(1e4, rel=1e-6)
    losses.sum().backward()
    assert torch.isfinite(policy_chosen.grad).all() and torch.isfinite(policy_rejected.grad).all()
    # d/dx softplus(-x) at x = -1e4 is -1: the wrongly ordered pair gets the full gradient beta.
    assert policy_chosen.grad[1].item() == pytest.approx(-0.1)


def test_shapes_are_per_pair():
    batch = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    for output in dpo_loss(*batch, 0.3):
        assert output.shape == (5,)


def test_conservative_dpo_and_ipo_closed_forms():
    logps = [torch.tensor([value], dtype=torch.float64) for value in (-4.0, -6.0, -5.0, -5.0)]
    beta, epsilon = 0.5, 0.1
    x = beta * 2.0  # (−4 − −5) − (−6 − −5)
    expected_cdpo = (1 - epsilon) * math.log1p(math.exp(-x)) + epsilon * math.log1p(math.exp(x))
    cdpo = resolve_loss("cdpo", label_smoothing=epsilon)
    assert cdpo(*logps, beta)[0].item() == pytest.approx(expected_cdpo, rel=1e-12)
    # IPO's log-ratios are per token: +1 over 4 chosen tokens, -1 over 2 rejected ones.
    counts = {"chosen_tokens": torch.tensor([4]), "rejected_tokens": torch.tensor([2])}
    assert ipo_loss(*logps, beta, **counts)[0].item() == pytest.approx((0.25 + 0.5 - 1 / (2 * beta)) ** 2, rel=1e-12)


def test_custom_loss_by_dotted_path():
    assert resolve_loss("dpo_recipe.loss:ipo_loss") is ipo_loss
    assert resolve_loss("dpo_recipe.loss.dpo_loss") is dpo_loss
    with pytest.raises(ValueError, match="could not be imported"):
        resolve_loss("dpo_recipe.loss:no_such_loss")
    with pytest.raises(ValueError, match="not one of"):
        resolve_loss("sigmoidd")


def test_trl_loss_names_are_read_as_ours_where_the_loss_is_the_same():
    assert set(BUILTIN_LOSSES) == set(LOSS_TYPES)  # what config validation accepts is what resolve_loss builds
    config = load_config(SMOKE_CONFIG, ["loss.type=sigmoid"])
    assert config.loss.type == "dpo"  # one name in config.yaml, reports and --resume
    assert resolve_loss("sigmoid") is dpo_loss
    # TRL 1.16's sigmoid ignores label smoothing, where ours becomes conservative DPO: not the same loss.
    with pytest.raises(ConfigError, match=r"^--set loss.type=sigmoid: loss.type sigmoid is TRL 1.16's plain DPO loss, "
                                          r"which ignores loss.label_smoothing \(0.1\): for conservative DPO set loss.type: cdpo$"):  # fmt: skip
        load_config(SMOKE_CONFIG, ["loss.type=sigmoid", "loss.label_smoothing=0.1"])


def _tokenized_pairs(tokenizer, count=6, max_length=96):
    config = DataConfig(
        source="synthetic", num_pairs=count, num_test_pairs=0, val_fraction=0.5, max_length=max_length, min_prompt_tokens=8
    )
    splits = load_text_splits(config, seed=3, report=DataReport())
    return tokenize_pairs(splits.train + splits.val, tokenizer, config, "all", DataReport())


def _arguments(tmp_path, **overrides):
    return DPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, report_to=[], beta=0.3,
        max_length=None, use_cpu=True, bf16=False, **overrides,
    )


class _PreTokenizedTRL(DPOTrainer):
    """Plain TRL fed the same token ids: only its tokenization step is skipped."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def _with_float64_log_probs(forward):
    def wrapped(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        if getattr(outputs, "log_probs", None) is not None:
            outputs.log_probs = outputs.log_probs.double()
        return outputs

    return wrapped


# Our loss config and TRL's DPOConfig arguments for the same definition.
SAME_LOSS_IN_TRL = {
    "dpo": ({"loss_type": "dpo"}, {"loss_type": ["sigmoid"]}),
    "ipo": ({"loss_type": "ipo"}, {"loss_type": ["ipo"]}),
    "hinge": ({"loss_type": "hinge"}, {"loss_type": ["hinge"]}),
    "robust": ({"loss_type": "robust", "label_smoothing": 0.1}, {"loss_type": ["robust"], "label_smoothing": 0.1}),
}


@pytest.mark.parametrize(
    "loss, share_prompt", [("dpo", False), ("ipo", False), *((name, True) for name in SAME_LOSS_IN_TRL)]
)
def test_trainer_loss_equals_trls_on_a_real_batch(tokenizer, tiny_gpt2, tmp_path, loss, share_prompt):
    ours_config, trl_config = SAME_LOSS_IN_TRL[loss]
    pairs = _tokenized_pairs(tokenizer)
    tiny_gpt2 = tiny_gpt2.double()
    reference = copy.deepcopy(tiny_gpt2)
    with torch.no_grad():  # move the policy away from the reference so rewards are not all zero
        generator = torch.Generator().manual_seed(1)
        for parameter in tiny_gpt2.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    policy = copy.deepcopy(tiny_gpt2)

    trl_trainer = _PreTokenizedTRL(
        model=tiny_gpt2, ref_model=reference, args=_arguments(tmp_path, **trl_config),
        train_dataset=pairs, processing_class=tokenizer,
    )
    trl_batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)([pairs[i] for i in range(len(pairs))])
    trl_trainer.model.train()
    trl_fp32_loss = trl_trainer.compute_loss(trl_trainer.model, trl_batch).item()
    # TRL's fused head yields fp32 per-token log-probs and TRL sums them in fp32, which rounds a sequence sum of a
    # few hundred by ~1e-5. Handing TRL's own loss code the same per-token values as float64 removes only that
    # rounding, so its built-in sigmoid loss can be compared at 1e-6.
    for model in (trl_trainer.model, trl_trainer.ref_model):
        model.forward = _with_float64_log_probs(model.forward)
    trl_loss = trl_trainer.compute_loss(trl_trainer.model, trl_batch).item()
    trl_metrics = {key: values[-1] for key, values in trl_trainer._metrics["train"].items()}

    # Our reference log-probs come from the same reference weights, through our own (cached) precompute.
    reference_copy = copy.deepcopy(reference)
    ours = RecipeDPOTrainer(
        model=policy, ref_model=reference_copy, args=_arguments(tmp_path, precompute_ref_log_probs=True),
        data_collator=PairCollator(tokenizer.pad_token_id, share_prompt=share_prompt), train_dataset=pairs,
        processing_class=tokenizer, loss_fn=resolve_loss(**ours_config), reference_cache_dir=str(tmp_path / "cache"),
    )
    batch = ours.data_collator([ours.train_dataset[i] for i in range(len(pairs))])
    ours.model.train()
    our_loss = ours.compute_loss(ours.model, batch).item()
    our_metrics = logged_means(ours)

    assert our_loss == pytest.approx(trl_loss, abs=1e-6)
    assert our_loss == pytest.approx(trl_fp32_loss, abs=2e-5)  # TRL unmodified, at its own fp32 rounding
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert our_metrics[key] == pytest.approx(trl_metrics[key], abs=1e-6), key
    assert abs(trl_metrics["rewards/margins"]) > 1e-3  # the comparison is not between zeros


def logged_means(trainer: RecipeDPOTrainer) -> dict[str, float]:
    """What the trainer's next log line would show for the steps so far, under TRL's metric names."""
    logs = {"loss": float("nan")}
    trainer.log(logs)
    return logs


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(tokenizer, tiny_gpt2, tmp_path):
    pairs = _tokenized_pairs(tokenizer)
    trainer = RecipeDPOTrainer(
        model=tiny_gpt2, args=_arguments(tmp_path, precompute_ref_log_probs=True),
        data_collator=PairCollator(tokenizer.pad_token_id), train_dataset=pairs, processing_class=tokenizer,
        loss_fn=dpo_loss, reference_cache_dir=str(tmp_path / "cache"),
    )
    assert trainer.ref_model is None  # the reference lives on disk as log-probs, not as a second model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    logged = logged_means(trainer)
    assert logged["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logged["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert logged["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)


def test_rpo_adds_each_pairs_own_per_token_nll():
    """Per pair, then averaged like the preference loss, so a pair's term does not depend on its batch."""
    policy_chosen = torch.tensor([-10.0, -30.0], dtype=torch.float64)
    policy_rejected = torch.tensor([-12.0, -29.0], dtype=torch.float64)
    reference = torch.tensor([-11.0, -30.0], dtype=torch.float64)
    counts = {"chosen_tokens": torch.tensor([5, 10]), "rejected_tokens": torch.tensor([6, 9])}
    rpo = resolve_loss("dpo", rpo_alpha=0.5)
    losses, _, _ = rpo(policy_chosen, policy_rejected, reference, reference, 0.3, **counts)
    plain, _, _ = dpo_loss(policy_chosen, policy_rejected, reference, reference, 0.3)
    assert (losses - plain).tolist() == pytest.approx([0.5 * 10 / 5, 0.5 * 30 / 10], rel=1e-12)
    # Each pair alone gives the same term as in the batch.
    for i in range(2):
        alone = {key: value[i : i + 1] for key, value in counts.items()}
        single = rpo(policy_chosen[i : i + 1], policy_rejected[i : i + 1], reference[i : i + 1], reference[i : i + 1], 0.3, **alone)
        assert single[0].item() == pytest.approx(losses[i].item(), rel=1e-12)


def test_rpo_equals_trls_sigmoid_plus_sft_on_each_pair_alone(tokenizer, tiny_gpt2, tmp_path):
    """TRL's `sft` term is per token over a batch's chosen tokens: on a batch of one pair, our per-pair term."""
    pairs = _tokenized_pairs(tokenizer)
    reference = copy.deepcopy(tiny_gpt2)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in tiny_gpt2.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    policy = copy.deepcopy(tiny_gpt2)
    trl_trainer = _PreTokenizedTRL(
        model=tiny_gpt2, ref_model=reference, processing_class=tokenizer, train_dataset=pairs,
        args=_arguments(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    )
    ours = RecipeDPOTrainer(
        model=policy, ref_model=copy.deepcopy(reference), args=_arguments(tmp_path, precompute_ref_log_probs=True),
        data_collator=PairCollator(tokenizer.pad_token_id), train_dataset=pairs, processing_class=tokenizer,
        loss_fn=resolve_loss("dpo", rpo_alpha=0.5), reference_cache_dir=str(tmp_path / "cache"),
    )
    trl_trainer.model.train()
    ours.model.train()
    collate_trl = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    per_pair = []
    for i in range(len(pairs)):
        trl_loss = trl_trainer.compute_loss(trl_trainer.model, collate_trl([pairs[i]])).item()
        our_loss = ours.compute_loss(ours.model, ours.data_collator([ours.train_dataset[i]])).item()
        assert our_loss == pytest.approx(trl_loss, abs=2e-5)  # TRL at its own fp32 rounding
        per_pair.append(our_loss)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(len(pairs))])
    assert ours.compute_loss(ours.model, batch).item() == pytest.approx(sum(per_pair) / len(per_pair), abs=1e-6)


def test_a_mixture_of_experts_model_adds_its_router_loss_as_trl_does(tokenizer, tmp_path):
    """A 2-expert Mixtral, policy == reference: the loss is ln 2 plus router_aux_loss_coef times the load-balancing
    loss the model's own forward computes over the same rows."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, router_aux_loss_coef=0.5,
        max_position_embeddings=256, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MixtralForCausalLM(config)
    pairs = _tokenized_pairs(tokenizer)
    for share_prompt in (False, True):
        trainer = RecipeDPOTrainer(
            model=model, args=_arguments(tmp_path, precompute_ref_log_probs=True), train_dataset=pairs,
            data_collator=PairCollator(tokenizer.pad_token_id, share_prompt=share_prompt), processing_class=tokenizer,
            loss_fn=dpo_loss, reference_cache_dir=str(tmp_path / "cache"),
        )
        assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch).item()
        assert loss > math.log(2) + 1e-3  # the router's term is there
        if not share_prompt:  # rows [prompt, response] with a padding mask, as the model's own forward reads them
            with torch.no_grad():
                own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
            assert loss == pytest.approx(math.log(2) + 0.5 * own.aux_loss.item(), abs=1e-6)
