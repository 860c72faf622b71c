"""instructor (TOOLS mode, its default) through both doors.

instructor 1.17 caps jiter below what openai 3.31+ needs, so it runs in the openai-2 venv."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from libs_env import Door, call, need, say
from pydantic import BaseModel

pytestmark = pytest.mark.libs


class Weather(BaseModel):
    city: str
    temp: float


def _client(door: Door) -> Any:
    return need("instructor").from_openai(door.client())


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_structured_output_through_a_tool_call(door: Door) -> None:
    w = _client(door).chat.completions.create(
        model="gpt-4o-mini", response_model=Weather, max_retries=0,
        messages=_user(call("Weather", '{"city": "Paris", "temp": 21}')))
    assert w.model_dump() == {"city": "Paris", "temp": 21}
    action = door.last_actions()[0]
    assert action["action_type"] == "Weather" and action["decision"] == "allow"


def test_async_and_streamed_partials(door: Door) -> None:
    instructor = need("instructor")

    async def main() -> Weather:
        client = instructor.from_openai(door.aclient())
        return await client.chat.completions.create(  # type: ignore[no-any-return]
            model="gpt-4o-mini", response_model=Weather, max_retries=0,
            messages=_user(call("Weather", '{"city": "Oslo", "temp": -3}')))

    assert asyncio.run(main()).model_dump() == {"city": "Oslo", "temp": -3}
    partials = list(_client(door).chat.completions.create_partial(
        model="gpt-4o-mini", response_model=Weather, max_retries=0,
        messages=_user(call("Weather", '{"city": "Paris", "temp": 21}'))))
    assert partials and partials[-1].city == "Paris" and partials[-1].temp == 21


def test_plain_completion_passes_through(door: Door) -> None:
    r = _client(door).chat.completions.create(
        model="gpt-4o-mini", response_model=None, messages=_user(say("plain text")))
    assert r.choices[0].message.content == "plain text"


def test_undeclared_output_tool_fails_loudly_not_silently(door: Door) -> None:
    class Unlisted(BaseModel):
        x: int

    exceptions = need("instructor.core.exceptions")
    with pytest.raises((exceptions.InstructorRetryException, AssertionError, ValueError)):
        _client(door).chat.completions.create(
            model="gpt-4o-mini", response_model=Unlisted, max_retries=0,
            messages=_user(call("Unlisted", '{"x": 1}')))
    assert door.last_actions()[0]["decision"] == "deny"


def test_denied_request_surfaces_the_openai_error(door: Door) -> None:
    exceptions = need("instructor.core.exceptions")
    with pytest.raises((openai.PermissionDeniedError,
                        exceptions.InstructorRetryException)) as ei:
        _client(door).chat.completions.create(
            model="gpt-4o", response_model=Weather, max_retries=0,
            messages=_user(call("Weather", '{"city": "Paris", "temp": 21}')))
    err: BaseException | None = ei.value
    while err is not None and not isinstance(err, openai.PermissionDeniedError):
        err = err.__cause__ or err.__context__
    assert isinstance(err, openai.PermissionDeniedError) and err.code == "model_not_allowed"
