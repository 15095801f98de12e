"""instructor over the official `openai` client against the server: `create` returning a
validated pydantic instance in JSON_SCHEMA mode (the server constrains the answer to the
response format's schema) and in TOOLS modes (a forced tool call constrained to the function's
schema), and `create_partial` streaming partial objects that grow as the server streams the
JSON (content deltas, or tool-call argument deltas) and end in a complete, valid object.

No retries anywhere: a first answer that does not validate is a failure, not a second try.
"""

from __future__ import annotations

import instructor
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import Server

EXTRACT = [{"role": "user", "content": "Alice is 30 years old. Extract the person."}]


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)


def patched(server: Server, mode: instructor.Mode) -> instructor.Instructor:
    return instructor.from_openai(
        openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0), mode=mode
    )


def ask(server: Server, mode: instructor.Mode):
    return patched(server, mode).chat.completions.create_with_completion(
        model=server.model, messages=EXTRACT, response_model=Person,
        temperature=0, max_tokens=60, max_retries=0,
    )


def test_json_schema_mode_returns_a_valid_instance(server: Server) -> None:
    person, raw = ask(server, instructor.Mode.JSON_SCHEMA)
    assert isinstance(person, Person)
    choice = raw.choices[0]
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    assert Person.model_validate_json(choice.message.content).model_dump() == person.model_dump()


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.TOOLS_STRICT])
def test_tools_mode_returns_a_valid_instance(server: Server, mode: instructor.Mode) -> None:
    person, raw = ask(server, mode)
    assert isinstance(person, Person)
    choice = raw.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "Person"
    assert Person.model_validate_json(call.function.arguments).model_dump() == person.model_dump()


@pytest.mark.parametrize("mode", [instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS])
def test_partials_grow_into_a_valid_instance(server: Server, mode: instructor.Mode) -> None:
    partials = list(
        patched(server, mode).chat.completions.create_partial(
            model=server.model, messages=EXTRACT, response_model=Person,
            temperature=0, max_tokens=60, max_retries=0,
        )
    )
    dumps = [p.model_dump() for p in partials]
    # The object is built as the JSON streams in: several distinct states, not one at the end.
    distinct = [d for i, d in enumerate(dumps) if i == 0 or d != dumps[i - 1]]
    assert len(distinct) >= 3, dumps
    assert dumps[0] != dumps[-1]
    final = Person.model_validate(dumps[-1])
    assert final.name and final.age is not None
    if mode is instructor.Mode.JSON_SCHEMA:
        # Same request, streamed or not: greedy decoding gives the same object.
        person, _ = ask(server, mode)
        assert final.model_dump() == person.model_dump()
