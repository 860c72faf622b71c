"""The gateway's one exception tree.

Every class carries the HTTP ``status_code`` and the wire ``code`` of DESIGN.md
§2/§3, so the proxy needs a single handler and the SDK maps each one onto the
matching ``openai`` error class.

    AuthorityError (500, authority_error)
    ├── PolicyError                      invalid policy file (not a request error)
    ├── AuthenticationFailed (401)       invalid_api_key
    ├── Forbidden (403)                  insufficient_role
    ├── RequestDenied (403)              policy said no — subclasses name the code
    │   ├── KillSwitchEngaged            kill_switch_engaged
    │   ├── ModelNotAllowed              model_not_allowed
    │   ├── ModelNotRouted               model_not_routed (no upstream of the policy serves it)
    │   ├── CostCeilingExceeded          cost_ceiling_exceeded
    │   ├── ModelPriceUnknown            model_price_unknown
    │   └── BudgetExceeded               budget_exceeded
    ├── InvalidRequest (400)             invalid_request
    │   ├── UnpriceableContent           unpriceable_content
    │   ├── RequestTooLarge (413)        request_too_large
    │   └── ClientOptionNotAllowed       client_option_not_allowed (SDK: a way around the gate)
    ├── NotFound (404)                   not_found
    │   └── EndpointNotAllowed           endpoint_not_allowed (an endpoint the gateway won't serve)
    ├── IdempotencyInProgress (409)      idempotency_request_in_progress
    ├── IdempotencyKeyReused (422)       idempotency_key_reused
    ├── ApprovalError (409)              approval_not_pending … (see ApprovalError.code)
    ├── ExecutionError (409)             execution_not_in_doubt
    ├── AuditIntegrityError (409)        audit_chain_broken (acknowledging a loss on a broken chain)
    ├── UpstreamError (502)              upstream_error
    │   └── UpstreamTimeout (504)        upstream_timeout
    └── AuthorityUnavailable (503)       authority_unavailable (state or audit unwritable)

``retryable`` tells the front doors whether a client retry could help: it sets
``x-should-retry: false`` on answers where it cannot.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ApprovalError",
    "AuditIntegrityError",
    "AuthenticationFailed",
    "AuthorityError",
    "AuthorityUnavailable",
    "BudgetExceeded",
    "ClientOptionNotAllowed",
    "CostCeilingExceeded",
    "EndpointNotAllowed",
    "ExecutionError",
    "Forbidden",
    "IdempotencyInProgress",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "KillSwitchEngaged",
    "ModelNotAllowed",
    "ModelNotRouted",
    "ModelPriceUnknown",
    "NotFound",
    "PolicyError",
    "RateLimited",
    "RequestDenied",
    "RequestTooLarge",
    "UnpriceableContent",
    "UpstreamError",
    "UpstreamTimeout",
    "upstream_error",
]


class AuthorityError(Exception):
    status_code: ClassVar[int] = 500
    default_code: ClassVar[str] = "authority_error"
    error_type: ClassVar[str] = "authority_error"
    retryable: ClassVar[bool] = False
    # Set by whoever already wrote this refusal to the audit log, so a front door that
    # audits the refusals it sees does not record it twice.
    audited: bool = False

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details

    def to_body(self) -> dict[str, Any]:
        """OpenAI's error shape, plus the details an aware client can use."""
        err: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "code": self.code,
            "param": None,
        }
        if self.details:
            err["authority"] = self.details
        return {"error": err}


class PolicyError(AuthorityError):
    default_code = "invalid_policy"
    error_type = "invalid_policy"

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


class AuthenticationFailed(AuthorityError):
    status_code = 401
    default_code = "invalid_api_key"
    error_type = "authentication_error"


class Forbidden(AuthorityError):
    status_code = 403
    default_code = "insufficient_role"
    error_type = "permission_error"


class RequestDenied(AuthorityError):
    status_code = 403
    default_code = "denied"
    error_type = "authority_denied"


class KillSwitchEngaged(RequestDenied):
    default_code = "kill_switch_engaged"


class ModelNotAllowed(RequestDenied):
    default_code = "model_not_allowed"


class ModelNotRouted(RequestDenied):
    """Allowed by the environment, but no entry of ``upstreams:`` serves it."""

    default_code = "model_not_routed"


class CostCeilingExceeded(RequestDenied):
    default_code = "cost_ceiling_exceeded"


class ModelPriceUnknown(RequestDenied):
    default_code = "model_price_unknown"


class BudgetExceeded(RequestDenied):
    default_code = "budget_exceeded"


class RateLimited(AuthorityError):
    """A key's rate limit (requests or tokens a minute, requests in flight). ``details``
    carries ``retry_after_s`` when waiting helps; the answer's ``Retry-After`` says it."""

    status_code = 429
    default_code = "rate_limited"
    error_type = "rate_limit_error"
    retryable = True


class InvalidRequest(AuthorityError):
    status_code = 400
    default_code = "invalid_request"
    error_type = "invalid_request_error"


class UnpriceableContent(InvalidRequest):
    """The request carries content whose cost the gateway cannot bound (DESIGN.md §2)."""

    default_code = "unpriceable_content"


class RequestTooLarge(InvalidRequest):
    status_code = 413
    default_code = "request_too_large"


class ClientOptionNotAllowed(InvalidRequest):
    """An openai client option that would send requests around the gate (its own signing,
    its own connection): refused when the client is built, never silently ungated."""

    default_code = "client_option_not_allowed"


class NotFound(AuthorityError):
    status_code = 404
    default_code = "not_found"
    error_type = "not_found_error"


# What the gateway serves; the refusal of anything else names it so the caller knows what to do.
SERVED_ENDPOINTS = ("POST /v1/chat/completions, POST /v1/responses, POST /v1/embeddings and "
                    "GET /v1/models")


class EndpointNotAllowed(NotFound):
    """An endpoint the gateway does not serve: the same answer from the proxy and the SDK."""

    default_code = "endpoint_not_allowed"
    error_type = "invalid_request_error"

    @classmethod
    def for_request(cls, method: str, path: str) -> EndpointNotAllowed:
        # A caller chooses the path: never echo it unbounded.
        method, path = method[:16], (path if len(path) <= 200 else path[:200] + "…")
        return cls(
            f"{method} {path} is not served by the AI Authority Gateway, which cannot vouch "
            f"for what it does not gate. It serves {SERVED_ENDPOINTS}: use chat completions "
            "or the Responses API with the whole conversation in the request, or call this "
            "endpoint without the gateway if your organisation allows it.")


class IdempotencyInProgress(AuthorityError):
    status_code = 409
    default_code = "idempotency_request_in_progress"
    error_type = "idempotency_error"
    retryable = True


class IdempotencyKeyReused(AuthorityError):
    status_code = 422
    default_code = "idempotency_key_reused"
    error_type = "idempotency_error"


class ApprovalError(AuthorityError):
    """An approval transition that cannot happen (already decided, expired, self-approval…)."""

    status_code = 409
    default_code = "approval_not_pending"
    error_type = "approval_error"


class ExecutionError(AuthorityError):
    """A journal entry that cannot be settled by hand (it is not ``in_doubt``)."""

    status_code = 409
    default_code = "execution_not_in_doubt"
    error_type = "execution_error"


class AuditIntegrityError(AuthorityError):
    """The audit chain fails verification for a reason no acknowledgement can settle
    (tampering, not a recorded loss)."""

    status_code = 409
    default_code = "audit_chain_broken"
    error_type = "audit_error"


class UpstreamError(AuthorityError):
    status_code = 502
    default_code = "upstream_error"
    error_type = "upstream_error"
    retryable = True


class UpstreamTimeout(UpstreamError):
    status_code = 504
    default_code = "upstream_timeout"


def upstream_error(exc: BaseException, *, timed_out: bool,
                   timeout_s: float | None = None) -> UpstreamError:
    """An HTTP library's failure to reach the upstream, in the gateway's codes: a timeout is
    504, anything else 502. Each front door tells timeouts apart in its own library's terms."""
    if timed_out:
        after = f" after {timeout_s:g}s" if timeout_s else ""
        return UpstreamTimeout(f"the upstream did not answer in time{after}")
    return UpstreamError(f"cannot reach the upstream: {type(exc).__name__}: {exc}")


class AuthorityUnavailable(AuthorityError):
    status_code = 503
    default_code = "authority_unavailable"
    error_type = "authority_unavailable"
    retryable = True
