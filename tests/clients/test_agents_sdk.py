"""The OpenAI Agents SDK with its default model (the Responses API) and a function tool."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest
from openai import AsyncOpenAI
from openai.types.responses import ResponseTextDeltaEvent

from tests.clients.conftest import (
    FINAL_ANSWER,
    MODEL,
    WEATHER_CALL,
    response_calls,
    tool_outputs,
    weather,
)
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan

if TYPE_CHECKING:  # importing the SDK takes seconds: only the tests that run it pay for it
    from agents import Agent, RunConfig

Run = Callable[[Callable[["RunConfig"], Awaitable[Any]]], Any]


@pytest.fixture
def run(responses_base_url: str, responses_api_key: str) -> Run:
    """Run an agent with the SDK's default provider (Responses model) on our base URL.

    The client lives and closes inside the run's own event loop; tracing, which
    would upload to OpenAI, is off.
    """
    from agents import RunConfig, set_tracing_disabled
    from agents.models.openai_provider import OpenAIProvider

    set_tracing_disabled(True)

    def runner(body: Callable[[RunConfig], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            async with AsyncOpenAI(base_url=responses_base_url, api_key=responses_api_key) as sdk:
                provider = OpenAIProvider(openai_client=sdk)
                return await body(RunConfig(model_provider=provider, tracing_disabled=True))

        return asyncio.run(main())

    return runner


def weather_agent(asked: list[str]) -> Agent:
    from agents import Agent, function_tool

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return weather(city)

    return Agent(name="Weather", instructions="Answer briefly.", model=MODEL, tools=[get_weather])


def test_an_agent_answers(run: Run, fake: FakeOpenAI) -> None:
    from agents import Agent, Runner

    agent = Agent(name="Greeter", instructions="Say hello.", model=MODEL)
    result = run(lambda config: Runner.run(agent, "Hello?", run_config=config))
    assert result.final_output == DEFAULT_TEXT
    assert [r.path for r in response_calls(fake)] == ["/v1/responses"]


def test_an_agent_calls_its_tool_and_answers_with_the_result(run: Run, fake: FakeOpenAI) -> None:
    from agents import Runner

    fake.queue(Plan(tool_calls=[WEATHER_CALL]), Plan(text=FINAL_ANSWER))
    asked: list[str] = []
    agent = weather_agent(asked)
    result = run(lambda config: Runner.run(agent, "Weather in Paris?", run_config=config))
    assert asked == ["Paris"]
    assert result.final_output == FINAL_ANSWER
    (output,) = tool_outputs(fake)
    assert output["call_id"] == WEATHER_CALL["call_id"] and output["output"] == weather("Paris")
    assert len(response_calls(fake)) == 2


def test_a_streamed_agent_run_with_a_tool(run: Run, fake: FakeOpenAI) -> None:
    from agents import Runner

    fake.queue(Plan(tool_calls=[WEATHER_CALL]), Plan(text=FINAL_ANSWER))
    asked: list[str] = []
    agent = weather_agent(asked)

    async def streamed(config: RunConfig) -> tuple[list[str], Any]:
        result = Runner.run_streamed(agent, "Weather in Paris?", run_config=config)
        deltas = [
            event.data.delta
            async for event in result.stream_events()
            if event.type == "raw_response_event" and isinstance(event.data, ResponseTextDeltaEvent)
        ]
        return deltas, result.final_output

    deltas, final = run(streamed)
    assert asked == ["Paris"]
    assert "".join(deltas) == FINAL_ANSWER == final
    assert all(r.body.get("stream") for r in response_calls(fake))
