"""The three speed-ups must not change what is computed: length grouping, the reference cache, prompt sharing."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl.trainer.utils import add_fused_lm_head

from dpo_recipe.config import SHARED_PROMPT_ATTENTION, DataConfig
from dpo_recipe.config_loader import load_config
from dpo_recipe.data import tokenize_pairs
from dpo_recipe.loss import resolve_loss
from dpo_recipe.packing import (
    LengthBuckets,
    LengthBucketSampler,
    PairCollator,
    bucket_batches,
    dataset_pair_logps,
    make_collator,
    pair_logps,
    plan_buckets,
)
from dpo_recipe.sources import DataReport, PreferencePair, split_dialogue
from dpo_recipe.synthetic import hh_length_rows
from dpo_recipe.run import prepare_run

from conftest import REPO


def shared_row(prompt: list[int], chosen: list[int], rejected: list[int]) -> tuple[int, ...]:
    """A pair's tokens as the shared-prompt layout lays them out: [prompt | chosen | prompt[-1], rejected]."""
    return tuple(prompt + chosen + [prompt[-1]] + rejected)


def test_length_grouping_visits_every_pair_once_per_epoch(smoke_config):
    run = prepare_run(smoke_config())
    trainer, train = run.trainer, run.trainer.train_dataset
    expected = Counter(map(shared_row, train["prompt_ids"], train["chosen_ids"], train["rejected_ids"]))
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.base_dataloader.batch_sampler.sampler, LengthGroupedSampler)
    orders = []
    for _ in range(2):
        seen = [
            tuple(ids[: int(count)].tolist())
            for batch in loader
            for ids, count in zip(batch["input_ids"], batch["pair_tokens"])
        ]
        assert Counter(seen) == expected  # each pair exactly once: none lost, none repeated
        orders.append(seen)
    assert orders[0] != orders[1]  # a fresh order every epoch


def test_cached_reference_logps_equal_a_fresh_pass(smoke_config, tmp_path):
    first = prepare_run(smoke_config())
    second = prepare_run(smoke_config(f"training.output_dir={tmp_path / 'second'}"))
    assert first.trainer.reference_cache_hits == {"train": False, "eval": False}
    assert second.trainer.reference_cache_hits == {"train": True, "eval": True}
    trainer = first.trainer  # untrained: its policy is the reference
    train = trainer.train_dataset
    chosen, rejected = dataset_pair_logps(
        trainer.model, train, trainer.data_collator, trainer.args.eval_batch_size, trainer.accelerator.device
    )
    cached = second.trainer.train_dataset
    torch.testing.assert_close(torch.tensor(cached["ref_chosen_logps"], dtype=chosen.dtype), chosen)
    torch.testing.assert_close(torch.tensor(cached["ref_rejected_logps"], dtype=rejected.dtype), rejected)


@pytest.mark.parametrize(
    "change",
    [
        # The same seed and shapes give bit-identical weights: only the head split differs.
        "model.tiny={n_layer: 2, n_embd: 64, n_head: 8}",
        "model.attn_implementation=eager",
        "training.prompt_sharing=false",
    ],
)
def test_a_change_to_what_the_reference_computes_misses_the_cache(smoke_config, tmp_path, change):
    first = prepare_run(smoke_config())
    changed = prepare_run(smoke_config(f"training.output_dir={tmp_path / 'changed'}", change))
    assert first.trainer.reference_cache_hits == {"train": False, "eval": False}
    assert changed.trainer.reference_cache_hits == {"train": False, "eval": False}
    if change.startswith("model.tiny"):
        weights = [run.trainer.model.state_dict() for run in (first, changed)]
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_the_four_study_configs_share_one_reference_pass(tmp_path):
    """The sweep points differ in beta, learning rate and epochs only, none of which the reference sees."""
    offline = [  # the same local stand-ins for gpt2 and hh-rlhf in every run
        "model.tiny={n_layer: 1, n_embd: 32, n_head: 2}", "model.tokenizer=local-bpe", "data.source=synthetic",
        "data.num_pairs=40", "data.num_test_pairs=8", "data.max_length=64",
        f"training.reference_cache_dir={tmp_path / 'cache'}", f"training.output_dir={tmp_path / 'runs'}",
    ]
    hits = []
    for name in ("beta0.3", "beta0.3_lr1e-5", "beta0.5", "beta0.7"):
        run = prepare_run(load_config(REPO / "configs" / f"{name}.yaml", offline))
        hits.append(run.trainer.reference_cache_hits)
    assert hits == [{"train": False, "eval": False}] + [{"train": True, "eval": True}] * 3
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train and val, once


@pytest.fixture
def uneven_pairs(tokenizer):
    """Six tokenized pairs whose prompts and responses differ in length, so every batch is padded."""
    rows = hh_length_rows(60, seed=3)
    pairs = [PreferencePair(i, *split_dialogue(row["chosen"], row["rejected"])) for i, row in enumerate(rows)]
    dataset = tokenize_pairs(pairs, tokenizer, DataConfig(max_length=200), "test", DataReport())
    by_length = sorted(range(len(dataset)), key=lambda i: dataset["length"][i])
    picked = [by_length[k] for k in (0, 11, 23, 35, 47, 59)]  # shortest to longest
    examples = [dataset[i] for i in picked]
    assert len({len(e["prompt_ids"]) for e in examples}) >= 4
    assert len({len(e["chosen_ids"]) for e in examples} | {len(e["rejected_ids"]) for e in examples}) >= 4
    return examples


def direct_logp(model, prompt: list[int], response: list[int]) -> float:
    """log p(response | prompt) from a plain forward on the unpadded sequence, via HF's own loss."""
    labels = torch.tensor([[-100] * len(prompt) + response])
    output = model(input_ids=torch.tensor([prompt + response]), labels=labels)
    return -output.loss.item() * len(response)  # the loss is the mean over the response tokens


@pytest.mark.parametrize("attention", SHARED_PROMPT_ATTENTION)
@pytest.mark.parametrize("model_fixture", ["tiny_gpt2", "tiny_llama"])
def test_shared_prompt_logps_equal_separate_and_direct_ones(model_fixture, attention, uneven_pairs, tokenizer, request):
    """Every attention implementation the recipe accepts, in both layouts, scores exactly what a plain forward does."""
    model = request.getfixturevalue(model_fixture)
    add_fused_lm_head(model)
    with torch.no_grad():
        direct = [
            torch.tensor([direct_logp(model, e["prompt_ids"], e[key]) for e in uneven_pairs], dtype=torch.float64)
            for key in ("chosen_ids", "rejected_ids")
        ]  # computed with the default attention (sdpa) and no custom mask
        model.set_attn_implementation(attention)
        assert model.config._attn_implementation == attention
        shared = pair_logps(model, PairCollator(tokenizer.pad_token_id, share_prompt=True)(uneven_pairs))
        separate = pair_logps(model, PairCollator(tokenizer.pad_token_id, share_prompt=False)(uneven_pairs))
    # fp32 sums of several hundred nats carry rounding of ~1e-4 absolute (measured 1.07e-4 on a 635-nat sum): the
    # relative term admits that and nothing more (1e-6 is about 8 float32 ulps).
    for got, want in zip(separate, direct):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-4)
    for got, want in zip(shared, separate):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-4)
    assert not torch.allclose(shared[0], shared[1])  # chosen and rejected are scored apart


@pytest.mark.parametrize("share_prompt", [True, False])
def test_rounding_the_batch_width_changes_no_log_prob(tiny_gpt2, uneven_pairs, tokenizer, share_prompt):
    add_fused_lm_head(tiny_gpt2)
    exact = PairCollator(tokenizer.pad_token_id, share_prompt=share_prompt)(uneven_pairs)
    rounded = make_collator(tokenizer.pad_token_id, share_prompt, pad_to_multiple_of=64)(uneven_pairs)
    assert rounded["input_ids"].shape[1] % 64 == 0 and rounded["input_ids"].shape[1] > exact["input_ids"].shape[1]
    assert torch.equal(rounded["pair_tokens"], exact["pair_tokens"])  # padding is not counted as work
    with torch.no_grad():
        for got, want in zip(pair_logps(tiny_gpt2, rounded), pair_logps(tiny_gpt2, exact)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_the_lm_head_projects_only_the_scored_positions(tiny_gpt2, uneven_pairs, tokenizer, monkeypatch):
    import dpo_recipe.packing as packing

    projected_rows = []
    real_head = packing.ChunkedLogProbFunction

    class CountingHead:
        @staticmethod
        def apply(hidden, *args):
            projected_rows.append(hidden.shape[0])
            return real_head.apply(hidden, *args)

    monkeypatch.setattr(packing, "ChunkedLogProbFunction", CountingHead)
    add_fused_lm_head(tiny_gpt2)
    batch = PairCollator(tokenizer.pad_token_id, share_prompt=True)(uneven_pairs)
    with torch.no_grad():
        pair_logps(tiny_gpt2, batch)
        plain = tiny_gpt2(input_ids=batch["input_ids"][:, :10])
    response_tokens = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in uneven_pairs)
    assert projected_rows == [response_tokens]  # not every position of the padded batch
    assert batch["input_ids"].numel() > response_tokens + 600  # prompts and padding are skipped
    assert plain.logits.shape[:2] == (len(uneven_pairs), 10)  # other forwards are left whole


def trl_fused_head_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The path the recipe used before: TRL's fused LM head over every position, labels -100 but where scored."""
    rows, width = batch["input_ids"].shape
    labels = torch.full((rows * width,), -100)
    labels[batch["scored_positions"]] = batch["scored_labels"]
    output = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        shift_labels=labels.view(rows, width), fused_lm_head=True, use_cache=False,
    )
    token_logps = output.log_probs.flatten()[batch["scored_positions"]].double()
    pairs = torch.zeros(len(batch["pair_tokens"]), dtype=torch.float64)
    chosen = batch["scored_chosen"]
    return pairs.index_add(0, batch["scored_pairs"], token_logps * chosen), pairs.index_add(0, batch["scored_pairs"], token_logps * ~chosen)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_the_scoring_head_equals_trls_fused_head(tiny_gpt2, uneven_pairs, tokenizer, share_prompt):
    add_fused_lm_head(tiny_gpt2)
    batch = PairCollator(tokenizer.pad_token_id, share_prompt=share_prompt)(uneven_pairs)
    with torch.no_grad():
        for got, want in zip(pair_logps(tiny_gpt2, batch), trl_fused_head_logps(tiny_gpt2, batch)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_bucket_padding_changes_no_log_prob(tiny_gpt2, uneven_pairs, tokenizer, share_prompt):
    """Wider rows and extra scored-position slots (position 0 against token 0, counted for neither side)."""
    add_fused_lm_head(tiny_gpt2)
    exact = PairCollator(tokenizer.pad_token_id, share_prompt=share_prompt)(uneven_pairs)
    width, scored = exact["input_ids"].shape[1], len(exact["scored_positions"])
    per_pair = -(-scored // len(uneven_pairs))
    buckets = LengthBuckets(widths=(width - 1, width + 40, width + 80), scored_per_pair=(per_pair - 5, per_pair + 9), multiple=8)
    padded = PairCollator(tokenizer.pad_token_id, share_prompt=share_prompt, buckets=buckets)(uneven_pairs)
    assert padded["input_ids"].shape[1] == width + 40  # the smallest bucket that holds the longest row
    slots = len(padded["scored_positions"])
    assert slots == buckets.scored(scored, len(uneven_pairs)) == -(-(per_pair + 9) * len(uneven_pairs) // 8) * 8
    assert slots > scored and not (padded["scored_chosen"][scored:] | padded["scored_rejected"][scored:]).any()
    assert torch.equal(padded["pair_tokens"], exact["pair_tokens"])  # padding is not counted as work
    with torch.no_grad():
        for got, want in zip(pair_logps(tiny_gpt2, padded), pair_logps(tiny_gpt2, exact)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bucket_plan_covers_the_data_with_few_shapes():
    lengths = [40 + (i * 37) % 200 for i in range(300)]
    scored = [n // 2 + (i % 7) for i, n in enumerate(lengths)]
    plan = plan_buckets(lengths, scored, count=4, multiple=64, batch_size=16)
    assert 1 <= len(plan.widths) <= 4 and all(w % 64 == 0 for w in plan.widths)
    assert plan.widths[-1] >= max(lengths) and plan.widths[0] >= min(lengths)
    assert list(plan.widths) == sorted(set(plan.widths)) and len(plan.scored_per_pair) <= 4
    buckets = [plan.bucket(n) for n in lengths]
    assert all(plan.widths[b] >= n for b, n in zip(buckets, lengths))
    # Every batch the sampler forms fits a bucket: its width and its scored-position count are bucket values.
    for seed in range(3):
        batches = bucket_batches(buckets, 16, torch.Generator().manual_seed(100 + seed))
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert all(len(batch) == 16 for batch in batches[:-1])  # only the last is short: the rest stay aligned
        assert sum(len({buckets[i] for i in batch}) > 1 for batch in batches) < len(plan.widths)  # boundaries only
        assert max(buckets[i] for i in batches[0]) == len(plan.widths) - 1  # the longest first
        for batch in batches:
            count = sum(scored[i] for i in batch)
            assert plan.width(max(lengths[i] for i in batch)) in plan.widths
            assert plan.scored(count, len(batch)) in {-(-s * len(batch) // 64) * 64 for s in plan.scored_per_pair}
            assert plan.scored(count, len(batch)) >= count


def test_length_buckets_visit_every_pair_once_per_epoch_in_bucket_shapes(smoke_config):
    run = prepare_run(smoke_config("training.length_buckets=3"))
    trainer, train = run.trainer, run.trainer.train_dataset
    buckets = trainer.data_collator.buckets
    assert buckets is not None and len(buckets.widths) >= 2
    expected = Counter(map(shared_row, train["prompt_ids"], train["chosen_ids"], train["rejected_ids"]))
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.base_dataloader.batch_sampler.sampler, LengthBucketSampler)
    orders, widths = [], set()
    for _ in range(2):
        seen = []
        for batch in loader:
            widths.add(batch["input_ids"].shape[1])
            pairs = len(batch["pair_tokens"])
            assert len(batch["scored_positions"]) in {-(-s * pairs // 8) * 8 for s in buckets.scored_per_pair}
            seen += [tuple(ids[: int(count)].tolist()) for ids, count in zip(batch["input_ids"], batch["pair_tokens"])]
        assert Counter(seen) == expected  # each pair exactly once: none lost, none repeated
        orders.append(seen)
    assert orders[0] != orders[1]  # a fresh order every epoch
    assert widths <= set(buckets.widths) and len(widths) >= 2


def test_log_probs_of_a_compiled_model_equal_eager_ones(tiny_gpt2, uneven_pairs, tokenizer):
    add_fused_lm_head(tiny_gpt2)
    batch = PairCollator(tokenizer.pad_token_id, share_prompt=True)(uneven_pairs)
    compiled = torch.compile(tiny_gpt2, backend="aot_eager")  # dynamo traces the scored-positions hook too
    with torch.no_grad():
        eager = pair_logps(tiny_gpt2, batch)
        for got, want in zip(pair_logps(compiled, batch), eager):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_an_empty_response_is_scored_as_eos_after_the_prompt_and_trains(tiny_gpt2, tokenizer, share_prompt):
    """A rater who preferred silence: the chosen side is end-of-sequence alone, in either layout."""
    prompt = "\n\nHuman: Where does my neighbour live?\n\nAssistant:"
    pairs = [
        PreferencePair(1, *split_dialogue(prompt + " ", prompt + " At 12 Elm Street, second floor.")),
        PreferencePair(2, *split_dialogue("\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?", "\n\nHuman: Hi!\n\nAssistant: What.")),
    ]
    dataset = tokenize_pairs(pairs, tokenizer, DataConfig(max_length=64), "train", DataReport())
    eos = tokenizer.eos_token_id
    assert dataset[0]["chosen_ids"] == [eos]
    add_fused_lm_head(tiny_gpt2)
    tiny_gpt2.eval()  # no dropout, so the direct computation below sees the same model
    batch = PairCollator(tokenizer.pad_token_id, share_prompt=share_prompt)(list(dataset))
    chosen, rejected = pair_logps(tiny_gpt2, batch)
    with torch.no_grad():
        logits = tiny_gpt2(input_ids=torch.tensor([dataset[0]["prompt_ids"]])).logits[0, -1]
        direct = torch.log_softmax(logits.double(), dim=-1)[eos]
        direct_rejected = direct_logp(tiny_gpt2, dataset[0]["prompt_ids"], dataset[0]["rejected_ids"])
    torch.testing.assert_close(chosen[0].detach(), direct, rtol=0, atol=1e-5)
    assert rejected[0].item() == pytest.approx(direct_rejected, abs=1e-4)
    assert batch["chosen_tokens"].tolist()[0] == 1

    # One DPO step's loss and rewards are finite and the empty response gets a gradient.
    reference = (chosen.detach() - 0.5, rejected.detach() + 0.5)
    losses, chosen_rewards, rejected_rewards = resolve_loss("dpo")(
        chosen, rejected, *reference, 0.1, chosen_tokens=batch["chosen_tokens"], rejected_tokens=batch["rejected_tokens"]
    )
    assert torch.isfinite(losses).all() and torch.isfinite(chosen_rewards).all() and torch.isfinite(rejected_rewards).all()
    assert chosen_rewards[0].item() == pytest.approx(0.05)
    (silent_grad,) = torch.autograd.grad(chosen[0], tiny_gpt2.lm_head.weight, retain_graph=True)
    assert silent_grad[eos].abs().sum() > 0  # the silent response alone moves the EOS logit
    losses.mean().backward()
    grads = [p.grad for p in tiny_gpt2.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
