"""Pre-call cost planning and budget reservation (DESIGN.md §2 step 5).

The plan never lets a request's actual cost pass the per-request ceiling or the
remaining budget: an explicit output limit that cannot be paid for is refused,
and a request with no limit gets the largest one that can be paid for (so no
"phantom" budget errors from reserving the model's whole output window).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from .effects import Decision, S, StoreOp
from .errors import BudgetExceeded, CostCeilingExceeded, ModelPriceUnknown, UnpriceableContent
from .formats.base import ParsedRequest
from .policy import Budget, Policy
from .pricing import (
    ModelPricing,
    PriceBook,
    actual_usd,
    estimate_usd,
    max_affordable_output_tokens,
)
from .tokens import PromptCount, TokenCounter
from .vision import image_rule

__all__ = ["MIN_OUTPUT_TOKENS", "CostPlan", "PlanDraft", "Reservation", "budget_counter",
           "draft_plan", "finish_plan", "plan_cost", "plan_d", "release_d", "settle_d"]

# The smallest answer worth asking for: a short reply or one small tool call.
# Below this the request is refused rather than sent with a useless limit.
MIN_OUTPUT_TOKENS = 16
# Used when the price map gives no output window for a model.
DEFAULT_MAX_OUTPUT_TOKENS = 4096
# Our prompt count approximates the upstream's (tools especially); reserving on a
# slightly inflated count keeps the actual cost under the reservation.
PROMPT_MARGIN = 1.03
PROMPT_MARGIN_TOKENS = 8

_PERIOD_SECONDS = {"hour": 3600, "day": 86400, "month": 31 * 86400}


def budget_counter(scope: str, name: str, budget: Budget, now: float | None = None) -> str:
    t = time.gmtime(now if now is not None else time.time())
    if budget.period == "hour":
        window = time.strftime("%Y-%m-%dT%H", t)
    elif budget.period == "day":
        window = time.strftime("%Y-%m-%d", t)
    else:
        window = time.strftime("%Y-%m", t)
    return f"budget:{scope}:{name}:{budget.period}:{window}"


@dataclass
class CostPlan:
    model: str
    pricing: ModelPricing
    prompt_tokens: int
    output_limit: int
    n: int
    injected_limit: bool
    estimate_usd: float
    ceiling_usd: float | None
    reserved_usd: float = 0.0
    counters: list[str] = field(default_factory=list)
    budget_ttl_s: float = 86400.0
    # Upstream attempts the reservation covers (an upstream and its fallbacks), and what the
    # attempts given up on may have cost: a timed-out call may still be billed.
    attempts: int = 1
    billed_usd: float = 0.0

    def charge_abandoned_attempt(self) -> None:
        """A timed-out attempt a fallback follows: count it as billed at its estimate."""
        self.billed_usd += self.estimate_usd

    def to_authority(self) -> dict[str, Any]:
        return {
            "estimate_usd": round(self.estimate_usd, 8),
            "ceiling_usd": self.ceiling_usd,
            "prompt_tokens_estimate": self.prompt_tokens,
            "max_output_tokens": self.output_limit,
            "max_output_tokens_set_by_gateway": self.injected_limit,
        }


def plan_d(draft: PlanDraft) -> Decision[CostPlan]:
    """The plan :func:`draft_plan` began — its estimate and ceiling checked — with its budget
    reserved. May set the output limit in the request (``req.data[req.limit_field]``). Each
    refusal names the setting that decided it."""
    ask = draft.reservation
    granted = None if ask is None else (yield ask.op())
    return finish_plan(draft, granted)


@dataclass(frozen=True)
class Reservation:
    """What a plan asks the budget for (``store.budget_reserve``'s arguments)."""

    counters: list[tuple[str, float]]
    min_usd: float
    max_usd: float
    ttl_s: float

    def op(self) -> StoreOp:
        return S.budget_reserve(self.counters, min_usd=self.min_usd, max_usd=self.max_usd,
                                ttl_s=self.ttl_s)


@dataclass
class PlanDraft:
    """A plan up to its reservation: the estimate and the ceiling checked, the counters to
    reserve against named. :func:`finish_plan` completes it with what was granted, so a
    caller may send the reservation together with another write (the engine, with the
    idempotency claim)."""

    req: ParsedRequest
    pricing: ModelPricing
    counted: PromptCount
    prompt: int
    unseen: int
    modal: dict[str, int]
    reserve_prompt: int
    ceiling: float | None
    window: int
    out: int
    counters: list[tuple[str, float]]
    rules: list[str]
    ttl: float
    attempts: int

    def est(self, out: int) -> float:
        return estimate_usd(self.pricing, self.reserve_prompt, out * self.req.n, **self.modal)

    def affordable(self, usd: float) -> int:
        return max_affordable_output_tokens(self.pricing, self.reserve_prompt, usd,
                                            **self.modal)

    @property
    def reservation(self) -> Reservation | None:
        """What to reserve; None with no budget on the request."""
        if not self.counters:
            return None
        req = self.req
        one = self.est(self.out) if req.explicit_limit is not None or not req.has_output \
            else self.est(min(self.out, MIN_OUTPUT_TOKENS))
        return Reservation(self.counters, one * self.attempts,
                           self.est(self.out) * self.attempts, self.ttl)


def draft_plan(
    policy: Policy,
    environment: str,
    caller_budget: Budget | None,
    caller_name: str,
    req: ParsedRequest,
    *,
    prices: PriceBook,
    counter: TokenCounter,
    attempts: int = 1,
) -> PlanDraft:
    """Estimate and check the ceiling, up to the reservation (:func:`plan_d` makes it);
    raises what it refuses before it.

    ``attempts`` is the length of the request's upstream chain (its upstream and the
    fallbacks): every attempt but the last may time out after the provider billed it, so
    the budget reserves each one's estimate. The per-request ceiling applies to one
    answer."""
    model = req.model
    pricing = prices.lookup(model)
    if pricing is None:
        raise ModelPriceUnknown(
            f"no price is known for model {model!r}; give one under 'pricing:' in the policy",
            decided_by="pricing")
    n = req.n
    counted = counter.count_request(model, req.count_body())
    prompt, unseen = _bound_unseen(model, pricing, counted)
    prompt += req.history_tokens  # earlier turns the provider keeps and bills again
    modal: dict[str, int] = {}
    if counted.image_tokens or counted.audio_tokens or unseen:
        modal = {"image_tokens": counted.image_tokens, "audio_tokens": counted.audio_tokens,
                 "unseen_tokens": unseen}
    reserve_prompt = math.ceil(prompt * PROMPT_MARGIN) + PROMPT_MARGIN_TOKENS
    env = policy.environments[environment]
    ceiling = env.ceilings.per_request_usd
    ceiling_rule = f"environments.{environment}.ceilings.per_request_usd"
    explicit = req.explicit_limit
    window = pricing.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS

    def est(out: int) -> float:
        return estimate_usd(pricing, reserve_prompt, out * n, **modal)

    def affordable(usd: float) -> int:
        return max_affordable_output_tokens(pricing, reserve_prompt, usd, **modal)

    if not req.has_output:
        out = 0  # embeddings: the input is the whole bill
        if ceiling is not None and est(0) > ceiling:
            raise CostCeilingExceeded(
                f"estimated cost ${est(0):.6f} ({_prompt_words(prompt, counted, unseen)} on "
                f"{model}) exceeds the per-request ceiling ${ceiling} of environment "
                f"{environment!r}", estimate_usd=est(0), ceiling_usd=ceiling,
                decided_by=ceiling_rule)
    elif explicit is not None:
        out = explicit
        if ceiling is not None and est(out) > ceiling:
            raise CostCeilingExceeded(
                f"estimated cost ${est(out):.6f} ({_prompt_words(prompt, counted, unseen)} + "
                f"up to {out * n} output tokens on {model}) exceeds the per-request ceiling "
                f"${ceiling} of environment {environment!r}",
                estimate_usd=est(out), ceiling_usd=ceiling, decided_by=ceiling_rule,
            )
    else:
        out = window
        if ceiling is not None and est(out) > ceiling:
            out = min(window, affordable(ceiling) // n)
            if out < MIN_OUTPUT_TOKENS:
                raise CostCeilingExceeded(
                    f"the prompt alone ({_prompt_words(prompt, counted, unseen)} on {model}) "
                    f"leaves no room for an answer under the per-request ceiling ${ceiling} "
                    f"of environment {environment!r}",
                    estimate_usd=est(MIN_OUTPUT_TOKENS), ceiling_usd=ceiling,
                    decided_by=ceiling_rule,
                )

    counters: list[tuple[str, float]] = []
    rules: list[str] = []
    ttl = 0.0
    if env.budget is not None:
        counters.append((budget_counter("env", environment, env.budget), env.budget.usd))
        rules.append(f"environments.{environment}.budget")
        ttl = max(ttl, _PERIOD_SECONDS[env.budget.period] * 2)
    if caller_budget is not None:
        counters.append((budget_counter("key", caller_name, caller_budget), caller_budget.usd))
        rules.append(f"keys.{caller_name}.budget")
        ttl = max(ttl, _PERIOD_SECONDS[caller_budget.period] * 2)

    return PlanDraft(req=req, pricing=pricing, counted=counted, prompt=prompt, unseen=unseen,
                     modal=modal, reserve_prompt=reserve_prompt, ceiling=ceiling, window=window,
                     out=out, counters=counters, rules=rules, ttl=ttl, attempts=attempts)


def finish_plan(draft: PlanDraft, granted: float | None) -> CostPlan:
    """The plan, given what its reservation was granted (``None``: refused; ignored for a
    plan with no budget). Raises :class:`BudgetExceeded` on a refusal."""
    d, req = draft, draft.req
    out, n, window, attempts = d.out, req.n, d.window, d.attempts
    explicit = req.explicit_limit
    reserved = 0.0
    ask = d.reservation
    if ask is not None:
        if granted is None:
            counters = ask.counters
            raise BudgetExceeded(
                f"the budget of {_budget_names(counters)} cannot pay for this request "
                f"(needs at least ${ask.min_usd:.6f}: "
                f"{_prompt_words(d.prompt, d.counted, d.unseen)} on {req.model}"
                + (f", reserved for {attempts} attempts: the upstream and its fallbacks"
                   if attempts > 1 else "") + ")",
                needed_usd=ask.min_usd, decided_by=" and ".join(d.rules),
            )
        reserved = granted
        if explicit is None and req.has_output and granted < d.est(out) * attempts:
            out = min(out, d.affordable(granted / attempts) // n)
            # Rounding can make the largest affordable limit dip below the floor we reserved for.
            out = max(out, min(MIN_OUTPUT_TOKENS, window))

    injected = explicit is None and req.has_output and out < window
    if injected:
        req.data[req.limit_field] = out
    return CostPlan(
        model=req.model, pricing=d.pricing, prompt_tokens=d.prompt, output_limit=out, n=n,
        injected_limit=injected, estimate_usd=d.est(out), ceiling_usd=d.ceiling,
        reserved_usd=reserved, counters=[c for c, _ in d.counters],
        budget_ttl_s=d.ttl or 86400.0, attempts=attempts,
    )


def _bound_unseen(model: str, pricing: ModelPricing, counted: PromptCount) -> tuple[int, int]:
    """(prompt tokens, of which unseen) once content the gateway cannot see is bounded.

    Unseen content (files, audio it cannot time, …) is priced as filling the model's input
    window: a provider refuses, unbilled, a prompt that does not fit it. Models that bill an
    image at a multiple of the context it takes (gpt-4o-mini, the patch models) can bill
    that multiple of the window.
    """
    if not counted.unseen_parts:
        return counted.tokens, 0
    limit = pricing.max_input_tokens
    if limit is None or limit <= 0:
        raise UnpriceableContent(
            f"the request carries content whose cost the gateway cannot bound from the request "
            f"(a file, audio in a format it cannot time, an image with no size limit…) and no "
            f"input window is known for model {model!r} to bound it; send text, images or "
            f"WAV/MP3 audio, or use a model whose limits are in the price map")
    bound = math.ceil(limit * image_rule(model).window_factor)
    if bound <= counted.tokens:
        return counted.tokens, 0
    return bound, bound - counted.tokens


def _prompt_words(prompt: int, counted: PromptCount, unseen: int) -> str:
    parts = []
    if counted.image_tokens:
        parts.append(f"{counted.image_tokens} for images")
    if counted.audio_tokens:
        parts.append(f"{counted.audio_tokens} for audio")
    if unseen:
        parts.append(f"{unseen} bounding files or other content by the input window")
    return f"prompt ~{prompt} tokens" + (f", of which {', '.join(parts)}" if parts else "")


def _budget_names(counters: list[tuple[str, float]]) -> str:
    return " and ".join(f"{c.split(':')[1]} {c.split(':')[2]!r} (${lim}/{c.split(':')[3]})"
                        for c, lim in counters)


def plan_cost(policy: Policy, environment: str, caller_budget: Budget | None,
              caller_name: str, body: dict[str, Any], *, store: Any, prices: PriceBook,
              counter: TokenCounter) -> CostPlan:
    """:func:`plan_d` run directly on a store, for a chat body held as a dict (tools, tests,
    benchmarks). A limit the gateway chooses is written into ``body``; the reservation
    covers the model's upstream chain, as the engine's does."""
    from .effects import run_on_store
    from .formats.chat import ChatCompletions

    req = ChatCompletions().from_data(body)
    chain = policy.route(req.model) or ()
    return run_on_store(plan_d(draft_plan(
        policy, environment, caller_budget, caller_name, req, prices=prices, counter=counter,
        attempts=max(1, len(chain)))), store)


def settle_d(plan: CostPlan, usage: dict[str, Any] | None) -> Decision[float]:
    """Turn the reservation into the actual cost; returns the actual cost in USD (the
    answer's, plus what abandoned attempts may have cost)."""
    actual, op = settle_op(plan, usage)
    if op is not None:
        yield op
    return actual


def settle_op(plan: CostPlan, usage: dict[str, Any] | None) -> tuple[float, StoreOp | None]:
    """The actual cost and the write that settles it (None: no counters), for a caller
    that sends it together with another write (``effects.StoreOps``)."""
    actual = (actual_usd(plan.pricing, usage) if usage else plan.estimate_usd) \
        + plan.billed_usd
    if not plan.counters:
        return actual, None
    return actual, S.budget_settle(plan.counters, reserved=plan.reserved_usd, actual=actual,
                                   ttl_s=plan.budget_ttl_s)


def release_d(plan: CostPlan) -> Decision[None]:
    """The call never happened (upstream failed): give the reservation back, less what
    abandoned attempts may have cost."""
    if plan.counters:
        yield S.budget_settle(plan.counters, reserved=plan.reserved_usd,
                              actual=plan.billed_usd, ttl_s=plan.budget_ttl_s)
