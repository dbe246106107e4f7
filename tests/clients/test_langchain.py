"""LangChain's ChatOpenAI on the Responses API (`use_responses_api=True`), with a tool."""

from __future__ import annotations

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.clients.conftest import (
    FINAL_ANSWER,
    MODEL,
    WEATHER_CALL,
    response_calls,
    tool_outputs,
    weather,
)
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return weather(city)


def chat(base_url: str, api_key: str) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=base_url, api_key=api_key, use_responses_api=True)


def test_invoke_and_stream(
    responses_base_url: str, responses_api_key: str, fake: FakeOpenAI
) -> None:
    llm = chat(responses_base_url, responses_api_key)
    assert llm.invoke("Say hello").text == DEFAULT_TEXT
    chunks = list(llm.stream("Say hello"))
    assert "".join(chunk.text for chunk in chunks) == DEFAULT_TEXT
    assert len([c for c in chunks if c.text]) > 1
    assert [r.path for r in response_calls(fake)] == ["/v1/responses"] * 2


def test_a_tool_call_and_the_answer_after_its_result(
    responses_base_url: str, responses_api_key: str, fake: FakeOpenAI
) -> None:
    fake.queue(Plan(tool_calls=[WEATHER_CALL]), Plan(text=FINAL_ANSWER))
    llm = chat(responses_base_url, responses_api_key).bind_tools([get_weather])
    question = HumanMessage("What is the weather in Paris?")
    asked = llm.invoke([question])
    (call,) = asked.tool_calls
    assert (call["name"], call["args"]) == ("get_weather", {"city": "Paris"})
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = llm.invoke([question, asked, result])
    assert answer.text == FINAL_ANSWER
    assert tool_outputs(fake)[-1]["output"] == weather("Paris")
