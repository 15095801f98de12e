"""LangChain's OpenAI integration (`langchain_openai`) against the server, used as applications
use it: `ChatOpenAI` invoked and streamed (the chunks add up to the invoked message, usage
included), a pydantic tool forced through `bind_tools` and its result sent back as a
`ToolMessage`, `with_structured_output` in json_schema mode, `OpenAIEmbeddings` giving the
vectors `/v1/embeddings` gives, and an unknown model surfacing as a 404 without retries.

Greedy decoding keeps the small chat model's answers deterministic; tool calls and structured
output are constrained by the server to their schemas, so they validate whatever the model.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Literal

import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import BaseModel, Field

from conftest import Server

QUESTION = "What is the capital of France?"
ASK_WEATHER = "What is the weather like in Paris today?"


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)


def chat_model(server: Server, **kw) -> ChatOpenAI:
    kw.setdefault("max_tokens", 16)
    return ChatOpenAI(
        base_url=server.base_url, api_key="x", model=server.model, temperature=0,
        max_retries=0, **kw,
    )


def direct_embeddings(server: Server, texts: list[str]) -> list[list[float]]:
    body = json.dumps({"model": server.embedding_model, "input": texts}).encode()
    req = urllib.request.Request(
        f"{server.base_url}/embeddings", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        data = json.loads(r.read())["data"]
    return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]


def assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) > 0
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6


# ---------------------------------------------------------------------------------------------
# chat


def test_invoke_answers_with_usage(server: Server) -> None:
    msg = chat_model(server).invoke(QUESTION)
    assert isinstance(msg, AIMessage)
    assert isinstance(msg.content, str) and msg.content.strip()
    assert msg.response_metadata["model_name"] == server.model
    assert msg.response_metadata["finish_reason"] in {"stop", "length"}
    usage = msg.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] > 0
    assert 0 < usage["output_tokens"] <= 16
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_stream_adds_up_to_invoke(server: Server) -> None:
    llm = chat_model(server, stream_usage=True)
    whole = llm.invoke(QUESTION)
    chunks = list(llm.stream(QUESTION))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    # Token by token, not one block.
    assert sum(1 for c in chunks if c.content) > 1
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total.content == whole.content
    assert total.response_metadata["finish_reason"] == whole.response_metadata["finish_reason"]
    # The usage comes in the stream's final chunk, and is the invoked call's.
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1
    assert with_usage[0].usage_metadata["input_tokens"] > 0
    assert with_usage[0].usage_metadata["output_tokens"] > 0
    assert total.usage_metadata["input_tokens"] == whole.usage_metadata["input_tokens"]
    assert total.usage_metadata["output_tokens"] == whole.usage_metadata["output_tokens"]


def test_forced_tool_call_validates_and_round_trips(server: Server) -> None:
    llm = chat_model(server, max_tokens=80)
    question = HumanMessage(ASK_WEATHER)
    ai = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke([question])
    assert ai.response_metadata["finish_reason"] == "tool_calls"
    assert not ai.invalid_tool_calls
    (call,) = ai.tool_calls
    assert call["name"] == "GetWeather"
    assert call["id"].startswith("call_")
    jsonschema.validate(call["args"], GetWeather.model_json_schema())
    GetWeather.model_validate(call["args"])

    result = ToolMessage(content="17 degrees celsius, light rain", tool_call_id=call["id"])
    answering = llm.bind_tools([GetWeather], tool_choice="none")
    answer = answering.invoke([question, ai, result], max_tokens=30)
    assert not answer.tool_calls
    assert isinstance(answer.content, str) and answer.content.strip()
    assert answer.response_metadata["finish_reason"] in {"stop", "length"}
    # The call and its result are in the prompt: longer than the question alone.
    bare = answering.invoke([question], max_tokens=1)
    assert answer.usage_metadata["input_tokens"] > bare.usage_metadata["input_tokens"] + 20


def test_structured_output_is_a_valid_instance(server: Server) -> None:
    llm = chat_model(server, max_tokens=60)
    structured = llm.with_structured_output(Person, method="json_schema", include_raw=True)
    out = structured.invoke("Alice is 30 years old. Extract the person.")
    assert out["parsing_error"] is None
    person = out["parsed"]
    assert isinstance(person, Person)
    raw = out["raw"]
    assert raw.response_metadata["finish_reason"] == "stop"
    assert Person.model_validate_json(raw.content) == person


# ---------------------------------------------------------------------------------------------
# embeddings


def test_embeddings_equal_the_endpoints(server: Server) -> None:
    emb = OpenAIEmbeddings(
        model=server.embedding_model, base_url=server.base_url, api_key="x",
        check_embedding_ctx_length=False, max_retries=0,
    )
    docs = ["The cat sat on the mat.", "Paris is the capital of France.", "hello"]
    direct = direct_embeddings(server, docs + ["Where is Paris?"])
    got_docs = emb.embed_documents(docs)
    assert len(got_docs) == len(docs)
    for a, b in zip(got_docs, direct):
        assert_close(a, b)
    assert_close(emb.embed_query("Where is Paris?"), direct[3])
    # Different texts, different vectors.
    assert max(abs(x - y) for x, y in zip(direct[0], direct[1])) > 1e-3


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_model_is_not_found(server: Server) -> None:
    llm = ChatOpenAI(base_url=server.base_url, api_key="x", model="no-such-model", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        llm.invoke(QUESTION)
    assert e.value.status_code == 404
    assert e.value.body["code"] == "model_not_found"
