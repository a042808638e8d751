"""Preference losses as pure functions of sequence log-probabilities.

Every loss takes the summed log-probabilities of the chosen (y_w) and rejected (y_l) responses under the policy and
the reference, beta, and (keyword) each response's token count, and returns `(losses, chosen_rewards,
rejected_rewards)`, each of shape (batch,). The implicit reward of a response is beta * (log pi_theta(y|x) -
log pi_ref(y|x)) (DPO paper, section 5). `dpo`, `ipo`, `hinge` and `robust` are TRL 1.16's definitions of the same
name, each tested against TRL's own code on a real batch. Two are not TRL's: `dpo` with `label_smoothing` (and
`cdpo`) is conservative DPO, which TRL 1.16's `sigmoid` does not implement (it ignores label_smoothing), tested in
closed form; and RPO's NLL (`rpo_alpha`) is taken per pair, then averaged (see `with_chosen_nll`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import TRL_LOSS_NAMES, import_loss_function

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], LossOutput]


def _rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    return chosen_rewards, rejected_rewards


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    **token_counts: torch.Tensor,
) -> LossOutput:
    """L = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]).

    With `label_smoothing` eps > 0 this is conservative DPO: the preference label is assumed flipped with
    probability eps. `logsigmoid` keeps it finite for any margin, where log(sigmoid(x)) would give -inf.
    """
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    logits = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2*beta))^2, h the difference of the per-token log-ratios.

    Each log-ratio is divided by its response's token count, as TRL does: summed log-ratios make the squared loss
    grow with response length, and TRL's authors confirmed the per-token form with the IPO authors. So beta means the
    same here as in TRL. The rewards stay the summed ones.
    """
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    chosen_per_token = (policy_chosen_logps - ref_chosen_logps) / chosen_tokens.clamp(min=1)
    rejected_per_token = (policy_rejected_logps - ref_rejected_logps) / rejected_tokens.clamp(min=1)
    losses = (chosen_per_token - rejected_per_token - 1 / (2 * beta)) ** 2
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    **token_counts: torch.Tensor,
) -> LossOutput:
    """SLiC's hinge (Zhao et al. 2023): max(0, 1 - beta * h); beta is the inverse of the margin it asks for."""
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = torch.relu(1 - (chosen_rewards - rejected_rewards))
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    **token_counts: torch.Tensor,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024): an unbiased loss when each label is flipped with probability eps < 0.5.

    Unlike cDPO it subtracts the flipped term and rescales by 1/(1 - 2 eps), so its expectation under the noise is
    the clean DPO loss.
    """
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    logits = chosen_rewards - rejected_rewards
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def with_chosen_nll(loss_fn: LossFn, alpha: float) -> LossFn:
    """RPO (Pang et al. 2024): the preference loss plus alpha times the chosen response's negative log-likelihood.

    The NLL is per pair: each chosen response's NLL per token, so the loss stays a per-pair value that training,
    validation and `eval` all average over pairs alike. TRL's `loss_type=["sigmoid", "sft"]` with weights [1, alpha]
    takes it per token over all chosen tokens of a batch instead, which makes a pair's term depend on the batch it
    lands in (the same checkpoint scored 6.46892 in validation batches and 6.46931 over the whole set); the two agree
    on a batch of one pair, or of chosen responses of one length.
    """

    @functools.wraps(loss_fn)
    def loss_with_nll(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, *,
                      chosen_tokens, rejected_tokens):  # fmt: skip
        losses, chosen_rewards, rejected_rewards = loss_fn(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
            chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
        )
        nll = -policy_chosen_logps / chosen_tokens.clamp(min=1)
        return losses + alpha * nll, chosen_rewards, rejected_rewards

    return loss_with_nll


BUILTIN_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "cdpo": dpo_loss, "hinge": hinge_loss, "robust": robust_loss}


def _passing_token_counts(function: Callable) -> LossFn:
    """`function` as a loss that accepts the token counts, dropping them if it declares neither them nor **kwargs."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature: assume the plain 5 arguments
        parameters = []
    if any(p.kind is p.VAR_KEYWORD or p.name == "chosen_tokens" for p in parameters):
        return function

    @functools.wraps(function)
    def without_token_counts(*args, chosen_tokens=None, rejected_tokens=None):
        return function(*args)

    return without_token_counts


def resolve_loss(loss_type: str, label_smoothing: float = 0.0, rpo_alpha: float | None = None) -> LossFn:
    """Map a config's `loss` section to a callable with `dpo_loss`'s signature (token counts as keywords).

    Anything that is not a built-in name (or TRL's name for one, `sigmoid`) is read as `package.module:function` (or
    `package.module.function`); such a function may leave out the token-count keywords. `rpo_alpha` adds RPO's NLL
    term to any of them.
    """
    loss_fn = _base_loss(TRL_LOSS_NAMES.get(loss_type, loss_type), label_smoothing)
    return with_chosen_nll(loss_fn, rpo_alpha) if rpo_alpha else loss_fn


def _base_loss(loss_type: str, label_smoothing: float) -> LossFn:
    if loss_type in ("dpo", "cdpo", "robust") and label_smoothing:
        return functools.partial(BUILTIN_LOSSES[loss_type], label_smoothing=label_smoothing)
    if loss_type in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[loss_type]
    return _passing_token_counts(import_loss_function(loss_type))
