"""Tripwires: no path of the installed openai (2.x or 3.x) reaches the upstream ungated.

Every resource method of the client is called against a recording HTTP server; only
``GET /models`` may reach it (filtered by policy), chat completions are gated, and
everything else is refused with ``endpoint_not_allowed`` or, for what does not go
through HTTP at all (WebSockets, provider signing, workload identity), with an
``AuthorityError`` before anything is sent.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import ScriptedServer, free_port, tool, user
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._resource import AsyncAPIResource, SyncAPIResource
from servers import HttpReceiver

from authority_sdk import (
    AsyncAuthorityClient,
    AuthorityClient,
    ClientOptionNotAllowed,
    EndpointNotAllowed,
    authority_of,
    gated_async_http_client,
    gated_http_client,
)

OPENAI_MAJOR = int(openai.__version__.split(".")[0])
httpx2: Any = pytest.importorskip("httpx2") if OPENAI_MAJOR >= 3 else None


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as r:
        r.reply(200, json={"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "x"},
            {"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "x"}]})
        yield r


def _client(policy: Path, base_url: str, cls: type[Any] = AuthorityClient, **kw: Any) -> Any:
    return cls(policy=str(policy), environment="prod", base_url=base_url, max_retries=0,
               timeout=5, api_key="sk-test", **kw)


# -- walking the client's resources -------------------------------------------------------

_SKIP_ATTRS = {"with_raw_response", "with_streaming_response"}
_RESOURCE_TYPES = (SyncAPIResource, AsyncAPIResource)


def _resources(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every resource reachable from a client or resource, by its cached properties."""
    for name, member in inspect.getmembers(type(obj)):
        if name.startswith("_") or name in _SKIP_ATTRS:
            continue
        if isinstance(member, functools.cached_property):
            value = getattr(obj, name)
            if isinstance(value, _RESOURCE_TYPES):
                yield f"{prefix}{name}", value
                yield from _resources(value, f"{prefix}{name}.")


def _methods(resource: Any) -> Iterator[tuple[str, Callable[..., Any]]]:
    for name, member in inspect.getmembers(type(resource)):
        if name.startswith("_") or name in _SKIP_ATTRS:
            continue
        if inspect.isfunction(member) and not isinstance(
                inspect.getattr_static(type(resource), name), functools.cached_property):
            yield name, getattr(resource, name)


def _dummy(param: inspect.Parameter) -> Any:
    ann = str(param.annotation)
    if "FileTypes" in ann or "FileContent" in ann:
        return ("a.txt", b"x")
    if any(t in ann for t in ("Iterable", "List", "SequenceNotStr", "Sequence[")):
        return ["x"]
    if any(t in ann for t in ("Dict", "Mapping", "Param", "dict[")) and "str" not in ann[:4]:
        return {}
    if ann.startswith(("int", "float")):
        return 1
    return "x"


def _call_args(fn: Callable[..., Any]) -> tuple[list[Any], dict[str, Any]]:
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL,
                                                                   p.VAR_KEYWORD):
            continue
        if p.kind == p.KEYWORD_ONLY:
            kwargs[p.name] = _dummy(p)
        else:
            args.append(_dummy(p))
    return args, kwargs


_CLIENT_SIDE = (TypeError, ValueError, KeyError, AttributeError, NotImplementedError,
                openai.OpenAIError, RuntimeError, AssertionError, OSError)


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "returned"
    if isinstance(exc, EndpointNotAllowed):
        return "refused"
    if isinstance(exc, openai.APIStatusError):
        code = exc.code
        return "refused" if code == "endpoint_not_allowed" else f"gated:{code}"
    if isinstance(exc, _CLIENT_SIDE):
        return "client-side"
    return f"unexpected:{type(exc).__name__}"


def _drive_sync(result: Any) -> None:
    if hasattr(result, "__enter__") and hasattr(result, "__exit__"):
        with result as inner:
            if hasattr(inner, "__iter__"):
                for _ in inner:
                    break
    elif hasattr(result, "__iter__") and not isinstance(result, str | bytes | dict):
        for _ in result:
            break


async def _drive_async(result: Any) -> None:
    if inspect.isawaitable(result):
        result = await result
    if hasattr(result, "__aenter__"):
        async with result as inner:
            if hasattr(inner, "__aiter__"):
                async for _ in inner:
                    break
    elif hasattr(result, "__aiter__"):
        async for _ in result:
            break


def _sent(receiver: HttpReceiver, since: int) -> list[tuple[str, str]]:
    return [(r.method, r.path.split("?")[0]) for r in receiver.requests[since:]]


def _walk(c: Any, receiver: HttpReceiver, drive: Callable[[Any], None]) -> dict[str, str]:
    """Call every method of every resource once; ``drive`` consumes what it returns."""
    outcomes: dict[str, str] = {}
    for rname, resource in _resources(c):
        for mname, fn in _methods(resource):
            before = len(receiver.requests)
            err: BaseException | None = None
            try:
                args, kwargs = _call_args(fn)
                drive(fn(*args, **kwargs))
            except Exception as e:
                err = e
            sent = _sent(receiver, before)
            outcomes[f"{rname}.{mname}"] = _outcome(err) + (f" SENT {sent}" if sent else "")
    return outcomes


def _check(outcomes: dict[str, str]) -> None:
    assert len(outcomes) > 100, "the walk found too few methods to mean anything"
    leaks = {}
    for name, outcome in outcomes.items():
        if name in ("models.list",):
            assert outcome == "returned SENT [('GET', '/v1/models')]", outcome
            continue
        if "SENT" in outcome or outcome.startswith("unexpected"):
            leaks[name] = outcome
        if name.endswith(".connect"):
            assert outcome == "refused", f"{name}: {outcome}"
    assert not leaks, f"neither gated nor refused: {json.dumps(leaks, indent=1)}"
    # the chat path is gated (the dummy model is not allowed), not refused
    assert outcomes["chat.completions.create"].startswith("gated:")
    refused = [n for n, o in outcomes.items() if o == "refused"]
    assert "completions.create" in refused
    # the Responses API is gated like chat (the dummy model is not allowed)
    assert outcomes["responses.create"].startswith("gated:")
    assert outcomes["embeddings.create"].startswith("gated:")
    # stored model output is not passed through: a response the gateway served comes from
    # its own record (none here), anything else is refused
    assert outcomes["responses.retrieve"] == "gated:response_not_found"
    assert outcomes["responses.input_items.list"] == "gated:response_not_found"
    assert "responses.cancel" in refused and "responses.delete" in refused
    assert "chat.completions.retrieve" in refused
    assert "responses.connect" in refused or OPENAI_MAJOR < 3


def test_every_sync_resource_method_is_gated_or_refused(
        write_policy: Callable[..., Path], receiver: HttpReceiver) -> None:
    c = _client(write_policy(), receiver.url("/v1"),
                websocket_base_url=receiver.url("/v1").replace("http", "ws"))
    _check(_walk(c, receiver, _drive_sync))


def test_every_async_resource_method_is_gated_or_refused(
        write_policy: Callable[..., Path], receiver: HttpReceiver) -> None:
    c = _client(write_policy(), receiver.url("/v1"), AsyncAuthorityClient)
    loop = asyncio.new_event_loop()  # one loop for the whole walk, as an app would have
    try:
        _check(_walk(c, receiver, lambda result: loop.run_until_complete(_drive_async(result))))
    finally:
        loop.close()


def test_connect_is_refused_on_copies_and_never_opens_a_socket(
        write_policy: Callable[..., Path], receiver: HttpReceiver) -> None:
    ws = receiver.url("/v1").replace("http", "ws")
    c = _client(write_policy(), receiver.url("/v1"), websocket_base_url=ws)
    for variant in (c, c.copy(), c.with_options(timeout=3), c.copy(environment="dev")):
        connects = [(n, fn) for rn, r in _resources(variant) for n, fn in _methods(r)
                    if n == "connect"]
        assert connects
        for _, fn in connects:
            args, kwargs = _call_args(fn)
            with pytest.raises(EndpointNotAllowed, match="WebSocket"), fn(*args, **kwargs):
                pass
    assert receiver.requests == []


# -- construction options that would go around the gate -------------------------------------

def test_provider_and_workload_identity_are_refused(write_policy: Callable[..., Path]) -> None:
    policy = str(write_policy())
    try:
        from openai.providers import bedrock

        provider: Any = bedrock(region="us-east-1", api_key="k")
    except ImportError:  # older 2.x: the option is refused whatever its value
        provider = object()
    for cls in (AuthorityClient, AsyncAuthorityClient):
        with pytest.raises(ClientOptionNotAllowed, match="provider") as ei:
            cls(policy=policy, provider=provider)
        assert ei.value.code == "client_option_not_allowed" and ei.value.status_code == 400
        identity = {"identity_provider_id": "i", "service_account_id": "s",
                    "provider": {"token_type": "jwt", "get_token": lambda: "t"}}
        with pytest.raises(ClientOptionNotAllowed, match="workload identity"):
            cls(policy=policy, workload_identity=identity)
    c = AuthorityClient(policy=policy)
    with pytest.raises(ClientOptionNotAllowed):
        c.copy(provider=provider)


# openai constructor parameter -> how to read it back from a client
_FIELDS: dict[str, Callable[[Any], Any]] = {
    "api_key": lambda c: c.api_key,
    "admin_api_key": lambda c: c.admin_api_key,
    "organization": lambda c: c.organization,
    "project": lambda c: c.project,
    "webhook_secret": lambda c: c.webhook_secret,
    "websocket_base_url": lambda c: c._authority_ws_base_url,
    "base_url": lambda c: str(c.base_url),
    "timeout": lambda c: c.timeout,
    "max_retries": lambda c: c.max_retries,
    "default_headers": lambda c: {k: v for k, v in c._custom_headers.items()},
    "default_query": lambda c: dict(c._custom_query),
    "data_residency": lambda c: getattr(c, "_data_residency", None),
}
# refused (see above), or the client itself, or openai's own copy() does not carry them
_NOT_CARRIED = {"provider", "workload_identity", "http_client",
                "_strict_response_validation", "_enforce_credentials"}


@pytest.mark.parametrize("cls", [AuthorityClient, AsyncAuthorityClient])
def test_copy_and_with_options_keep_every_constructor_field(
        write_policy: Callable[..., Path], upstream: ScriptedServer, cls: type[Any]) -> None:
    params = set(inspect.signature(openai.OpenAI.__init__).parameters) - {"self"}
    unknown = params - set(_FIELDS) - _NOT_CARRIED
    assert not unknown, f"openai added constructor fields; carry them in copy(): {unknown}"
    values: dict[str, Any] = {
        "api_key": "sk-copy", "admin_api_key": "admin-copy", "organization": "org-1",
        "project": "proj-1", "webhook_secret": "whsec", "websocket_base_url": "ws://127.0.0.1:9/v1",
        "base_url": upstream.base_url + "/", "timeout": 7.0, "max_retries": 0,
        "default_headers": {"x-app": "tests"}, "default_query": {"q": "1"}}
    values = {k: v for k, v in values.items() if k in params}
    c = cls(policy=str(write_policy()), environment="prod", caller="copier", **values)
    for copy in (c.copy(), c.with_options(), c.copy(max_retries=1)):
        for name in values:
            if name == "max_retries" and copy.max_retries == 1:
                continue
            assert _FIELDS[name](copy) == _FIELDS[name](c), name
        assert copy.gateway is c.gateway and copy.environment == "prod"
        assert copy.authority_caller == c.authority_caller
        assert copy._client is c._client  # same gate, not stacked
    moved = c.copy(environment="dev")
    assert moved.environment == "dev" and moved._client._transport.caller.environment == "dev"
    assert moved._client._transport.inner is c._client._transport.inner  # re-gated, not stacked


def test_copies_stay_gated(write_policy: Callable[..., Path], upstream: ScriptedServer) -> None:
    c = AuthorityClient(policy=str(write_policy()), environment="prod", max_retries=0)
    before = upstream.chat_requests
    for variant in (c.copy(), c.with_options(timeout=3), c.copy(environment="dev"),
                    c.with_options(base_url=upstream.base_url)):
        with pytest.raises(openai.PermissionDeniedError):
            variant.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert upstream.chat_requests == before
    dev = c.copy(environment="dev")
    r = dev.chat.completions.create(model="gpt-4o-mini", messages=user(
        'CALL send_note {"text": "x"}'), tools=[tool("send_note")])
    assert authority_of(r).environment == "dev"
    assert authority_of(r).actions[0].status == "simulated"  # dev forces simulation


# -- the caller's own client is wrapped, not replaced ----------------------------------------

def _own_clients() -> list[tuple[str, Any]]:
    libs = [("httpx", httpx)]
    if httpx2 is not None:
        libs.append(("httpx2", httpx2))
    return libs


@pytest.mark.parametrize(("name", "lib"), _own_clients())
def test_own_http_client_is_wrapped(write_policy: Callable[..., Path], upstream: ScriptedServer,
                                    name: str, lib: Any) -> None:
    seen: list[str] = []
    own = lib.Client(event_hooks={"request": [lambda r: seen.append(r.url.path)]},
                     timeout=lib.Timeout(9.0))
    c = AuthorityClient(policy=str(write_policy()), environment="prod", max_retries=0,
                        http_client=own)
    assert type(c._client).__module__.split(".")[0] == name
    assert repr(c.timeout) == repr(own.timeout)  # its settings still apply
    before = upstream.chat_requests
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert seen == [] and upstream.chat_requests == before  # denied: never sent
    r = c.chat.completions.create(model="gpt-4o-mini", messages=user("SAY wrapped"))
    assert r.choices[0].message.content == "wrapped"
    assert seen == ["/v1/chat/completions"]  # went out through the caller's own client
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4o-mini", prompt="x")
    assert seen == ["/v1/chat/completions"]


def test_async_own_http_client_is_wrapped(write_policy: Callable[..., Path],
                                          upstream: ScriptedServer) -> None:
    lib = httpx2 if httpx2 is not None else httpx
    seen: list[str] = []

    async def hook(r: Any) -> None:
        seen.append(r.url.path)

    async def main() -> None:
        own = lib.AsyncClient(event_hooks={"request": [hook]})
        c = AsyncAuthorityClient(policy=str(write_policy()), environment="prod",
                                 max_retries=0, http_client=own)
        r = await c.chat.completions.create(model="gpt-4o-mini", messages=user("SAY hi"))
        assert r.choices[0].message.content == "hi"
        with pytest.raises(openai.PermissionDeniedError):
            await c.chat.completions.create(model="gpt-4o", messages=user("hi"))

    asyncio.run(main())
    assert seen == ["/v1/chat/completions"]


def test_models_list_is_filtered_by_policy(write_policy: Callable[..., Path],
                                           upstream: ScriptedServer) -> None:
    c = AuthorityClient(policy=str(write_policy()), environment="prod", max_retries=0)
    assert [m.id for m in c.models.list()] == ["gpt-4o-mini"]
    dev = c.copy(environment="dev")
    listed = {m.id for m in dev.models.list()}
    assert "gpt-4o-mini" in listed and all(
        m == "gpt-4o-mini" or m.startswith("gpt-4.1-") for m in listed)
    with pytest.raises(openai.NotFoundError) as ei:
        c.models.retrieve("gpt-4o")
    assert ei.value.code == "endpoint_not_allowed"

    async def main() -> list[str]:
        a = AsyncAuthorityClient(policy=str(write_policy()), environment="prod")
        return [m.id async for m in a.models.list()]

    assert asyncio.run(main()) == ["gpt-4o-mini"]


def test_models_list_falls_back_to_literal_patterns(write_policy: Callable[..., Path],
                                                    receiver: HttpReceiver) -> None:
    receiver.reply(500, json={"error": {"message": "down"}})
    c = _client(write_policy(), receiver.url("/v1"))
    assert [m.id for m in c.models.list()] == ["gpt-4o-mini"]  # as the proxy answers
    gone = _client(write_policy(), f"http://127.0.0.1:{free_port()}/v1")  # nothing listens
    assert [m.id for m in gone.models.list()] == ["gpt-4o-mini"]


# -- a gated httpx client for libraries that take http_client= --------------------------------

@pytest.mark.parametrize("library", [None, "httpx", *(["httpx2"] if httpx2 else [])])
def test_gated_http_client_gates_an_ordinary_openai_client(
        write_policy: Callable[..., Path], upstream: ScriptedServer, library: str | None) -> None:
    hc = gated_http_client(policy=str(write_policy()), environment="prod", http_library=library)
    expected = library or ("httpx2" if OPENAI_MAJOR >= 3 else "httpx")
    assert type(hc).__module__.split(".")[0] == expected
    plain = openai.OpenAI(api_key="sk-x", base_url=upstream.base_url, http_client=hc,
                          max_retries=0)
    before = upstream.chat_requests
    with pytest.raises(openai.PermissionDeniedError):
        plain.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert upstream.chat_requests == before
    r = plain.chat.completions.create(model="gpt-4o-mini", messages=user(
        'CALL send_note {"text": "x"}'), tools=[tool("send_note")])
    assert authority_of(r).actions[0].status == "executed"
    # the raw client itself is gated too: no way around it by posting directly
    raw = hc.post(upstream.base_url + "/chat/completions",
                  json={"model": "gpt-4o", "messages": user("hi")})
    assert raw.status_code == 403 and raw.json()["error"]["code"] == "model_not_allowed"
    refused = hc.post(upstream.base_url + "/completions", json={"prompt": "x"})
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "endpoint_not_allowed"
    assert upstream.chat_requests == before + 1


def test_gated_async_http_client(write_policy: Callable[..., Path],
                                 upstream: ScriptedServer) -> None:
    async def main() -> None:
        hc = gated_async_http_client(policy=str(write_policy()), environment="prod")
        plain = openai.AsyncOpenAI(api_key="sk-x", base_url=upstream.base_url,
                                   http_client=hc, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):
            await plain.chat.completions.create(model="gpt-4o", messages=user("hi"))
        r = await plain.chat.completions.create(model="gpt-4o-mini", messages=user("SAY a"))
        assert authority_of(r).decision == "allow"

    asyncio.run(main())


def test_gated_http_client_rejects_a_client_of_the_wrong_kind(
        write_policy: Callable[..., Path]) -> None:
    with pytest.raises(TypeError, match="AsyncClient"):
        gated_async_http_client(policy=str(write_policy()), http_client=httpx.Client())
    with pytest.raises(ValueError, match="unknown HTTP library"):
        gated_http_client(policy=str(write_policy()), http_library="requests")


# -- hostile methods and paths through the gated client ---------------------------------------

_METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS",
                            "QUERY", "post", "Get"])
_SEGMENT = st.text(st.characters(codec="ascii", exclude_characters="?#"), max_size=12)
_PATHS = st.one_of(
    st.lists(_SEGMENT, max_size=5).map(lambda p: "/v1/" + "/".join(p)),
    st.sampled_from(["/v1/chat/completions", "/v1/models", "/v1/models/", "/v1/responses",
                     "/v1/chat/completions/x", "/v1/chat%2Fcompletions", "/v1/embeddings",
                     "/v1/chat/completions/", "/v1/../v1/chat/completions"]))


def test_nothing_but_gated_chat_and_model_listing_reaches_the_inner_client(
        write_policy: Callable[..., Path]) -> None:
    from authority_sdk.engine import Gateway

    lib = httpx2 if httpx2 is not None else httpx
    seen: list[tuple[str, str]] = []

    def handler(request: Any) -> Any:
        seen.append((request.method, request.url.path))
        return lib.Response(200, json={"object": "list", "data": [{"id": "gpt-4o"}]})

    gw = Gateway(str(write_policy()))
    gated = gated_http_client(gateway=gw, environment="prod",
                              http_client=lib.Client(transport=lib.MockTransport(handler)))

    @settings(max_examples=150, deadline=None)
    @given(method=_METHODS, path=_PATHS, body=st.binary(max_size=64))
    def check(method: str, path: str, body: bytes) -> None:
        seen.clear()
        try:
            r = gated.request(method, "http://upstream.test" + path, content=body)
        except (lib.InvalidURL, lib.UnsupportedProtocol, ValueError):
            return  # the HTTP library refused the URL itself: nothing was sent
        for m, p in seen:  # only a model listing passes through, and is filtered
            assert m == "GET" and p.rstrip("/").endswith("/models"), (m, p)
            assert r.json()["data"] == []  # gpt-4o is not allowed in prod
        if not seen:
            assert r.status_code in (400, 403, 404), (method, path, r.status_code)

    try:
        check()
    finally:
        gw.close()
