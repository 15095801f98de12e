"""Structured output through the official SDK: `response_format` json_object and
json_schema, the SDK's `parse` helper with a pydantic model, and vLLM's `guided_*` extras.
Every output is checked with the `jsonschema` package, not by eye."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pydantic
import pytest

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {
            "type": "array",
            "items": {"enum": ["cat", "dog", "fish"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 15},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pets", "address"],
    "additionalProperties": False,
}

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_validates(client: openai.OpenAI, model_id: str, seed: int) -> None:
    r = client.chat.completions.create(
        model=model_id,
        messages=MESSAGES,
        temperature=1.0,
        seed=seed,
        max_tokens=300,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        },
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)


# json_object bounds nothing: a prompt that leaves the shape open ("Describe a person as
# JSON.") lets a 135M model's greedy path nest keys until max_tokens on some float roundings
# and close at 70 tokens on others. Naming the keys gives the same short object on every
# kernel variant tried (the per-head and the blocked attention, libm and polynomial exp).
OBJECT_MESSAGES = [
    {"role": "user", "content": "Describe a person as a JSON object with the keys name and age."}
]


def test_json_object_output_is_an_object(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id,
        messages=OBJECT_MESSAGES,
        temperature=0,
        max_tokens=300,
        response_format={"type": "json_object"},
    )
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, {"type": "object"})


def test_streamed_json_schema_output_validates(client: openai.OpenAI, model_id: str) -> None:
    stream = client.chat.completions.create(
        model=model_id,
        messages=MESSAGES,
        temperature=1.0,
        seed=4,
        max_tokens=300,
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        },
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)


class Address(pydantic.BaseModel):
    city: str
    zip: int


class Person(pydantic.BaseModel):
    name: str
    age: int
    address: Address


def test_parse_with_a_pydantic_model(client: openai.OpenAI, model_id: str) -> None:
    r = client.beta.chat.completions.parse(
        model=model_id,
        messages=MESSAGES,
        temperature=1.0,
        seed=5,
        max_tokens=300,
        response_format=Person,
    )
    message = r.choices[0].message
    assert isinstance(message.parsed, Person), message.content
    jsonschema.validate(json.loads(message.content), Person.model_json_schema())


def test_guided_regex_and_grammar(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Give a code."}],
        temperature=1.0,
        seed=6,
        max_tokens=50,
        extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2,4}"},
    )
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2,4}", r.choices[0].message.content)
    r = client.completions.create(
        model=model_id,
        prompt="Is the sky blue? Answer:",
        temperature=1.0,
        seed=7,
        max_tokens=10,
        extra_body={"guided_grammar": 'start: " yes" | " no"'},
    )
    assert r.choices[0].text in (" yes", " no")
    r = client.completions.create(
        model=model_id,
        prompt="Is the sky blue? Answer:",
        temperature=1.0,
        seed=8,
        max_tokens=10,
        extra_body={"grammar": '%llguidance {}\nstart: " yes" | " no"'},
    )
    assert r.choices[0].text in (" yes", " no")


def test_bad_constraints_are_400s(client: openai.OpenAI, model_id: str) -> None:
    bad = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"response_format": {"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
        {"extra_body": {"guided_grammar": "start: ("}},
        {"extra_body": {"grammar": 'root ::= ("a"'}},
    ]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=model_id, messages=MESSAGES, max_tokens=5, **kwargs
            )
