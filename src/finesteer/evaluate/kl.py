"""The collateral change of a steering: KL(p_reference ‖ p_steered) of the next token on harmless prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from finesteer.data.prompts import chat_prompt
from finesteer.evaluate.errors import EvaluationError
from finesteer.fit.steering import Steering
from finesteer.scoring.forward import log_probs_at

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel


def next_token_kl_between(
    reference: LoadedModel,
    setup: Steering,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
) -> list[float]:
    """KL(p_reference ‖ p_setup) of the next token after each harmless user prompt, in nats.

    The reference sees the plain chat prompt; the setup sees it with its system prompt, through its
    own weights and intervention. For a same-model intervention this is
    `finesteer.evaluate.helpfulness.next_token_kl`.
    """
    if not prompts:
        raise EvaluationError("no harmless prompts for the KL")
    lm = setup.lm if setup.lm is not None else reference
    values: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        base_seqs = [token_ids(reference, chat_prompt(reference.tokenizer, p)) for p in chunk]
        seqs = [token_ids(lm, chat_prompt(lm.tokenizer, p, system=setup.system_prompt)) for p in chunk]
        base = log_probs_at(reference, base_seqs, [[len(s) - 1] for s in base_seqs])[:, 0].double()
        with setup.apply(lm):
            steered = log_probs_at(lm, seqs, [[len(s) - 1] for s in seqs])[:, 0].double()
        if base.shape != steered.shape:
            raise EvaluationError("the setup's vocabulary differs from the reference model's; KL undefined")
        kl = (base.exp() * (base - steered)).sum(dim=-1)
        values += [max(0.0, float(v)) for v in kl]
    return values


def token_ids(lm: LoadedModel, text: str) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])




__all__ = ["next_token_kl_between", "token_ids"]
