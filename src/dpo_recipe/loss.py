"""Preference losses as pure functions of sequence log-probabilities.

Every loss takes the summed log-probabilities of the chosen (y_w) and rejected (y_l) responses under the policy and
the reference, beta, and (keyword) each response's token count, and returns `(losses, chosen_rewards,
rejected_rewards)`, each of shape (batch,). The implicit reward of a response is beta * (log pi_theta(y|x) -
log pi_ref(y|x)) (DPO paper, section 5). Each built-in loss is TRL 1.16's definition of the same name, and is tested
against TRL's own code on a real batch.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

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


BUILTIN_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "cdpo": dpo_loss}


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


def resolve_loss(loss_type: str, label_smoothing: float = 0.0) -> LossFn:
    """Map a config's `loss.type` to a callable with `dpo_loss`'s signature (token counts as keywords).

    Anything that is not a built-in name is read as `package.module:function` (or `package.module.function`); such a
    function may leave out the token-count keywords.
    """
    if loss_type == "cdpo":
        return functools.partial(dpo_loss, label_smoothing=label_smoothing)
    if loss_type == "dpo":
        return functools.partial(dpo_loss, label_smoothing=label_smoothing) if label_smoothing else dpo_loss
    if loss_type in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[loss_type]
    module_name, sep, attribute = loss_type.rpartition(":") if ":" in loss_type else loss_type.rpartition(".")
    if not sep or not module_name:
        raise ValueError(
            f"loss.type {loss_type!r} is not one of {', '.join(BUILTIN_LOSSES)} nor a dotted path module:function"
        )
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"loss.type {loss_type!r} could not be imported: {error}") from None
    if not callable(function):
        raise ValueError(f"loss.type {loss_type!r} is not callable")
    return _passing_token_counts(function)
