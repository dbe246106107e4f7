"""pydantic-ai's Responses model (`OpenAIResponsesModel`), with a provider base_url and a tool."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from tests.clients.conftest import (
    FINAL_ANSWER,
    MODEL,
    WEATHER_CALL,
    response_calls,
    tool_outputs,
    weather,
)
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan

if TYPE_CHECKING:  # importing the library takes a while: only its tests pay for it
    from pydantic_ai import Agent

Run = Callable[[Callable[["Agent[None, str]"], Awaitable[Any]]], Any]


@pytest.fixture
def asked() -> list[str]:
    return []


@pytest.fixture
def run(responses_base_url: str, responses_api_key: str, asked: list[str]) -> Run:
    """Run a body with a weather agent whose provider has our base_url, in one event loop."""

    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    def runner(body: Callable[[Agent[None, str]], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            provider = OpenAIProvider(base_url=responses_base_url, api_key=responses_api_key)
            agent = Agent(OpenAIResponsesModel(MODEL, provider=provider), instructions="Be brief.")

            @agent.tool_plain
            def get_weather(city: str) -> str:
                """The weather in a city."""
                asked.append(city)
                return weather(city)

            try:
                return await body(agent)
            finally:
                await provider.client.close()

        return asyncio.run(main())

    return runner


def test_an_agent_answers(run: Run, fake: FakeOpenAI) -> None:
    result = run(lambda agent: agent.run("Say hello"))
    assert result.output == DEFAULT_TEXT
    assert [r.path for r in response_calls(fake)] == ["/v1/responses"]
    assert result.usage.output_tokens == fake.biller.bills[0].completion_tokens


def test_an_agent_calls_its_tool_and_answers_with_the_result(
    run: Run, fake: FakeOpenAI, asked: list[str]
) -> None:
    fake.queue(Plan(tool_calls=[WEATHER_CALL]), Plan(text=FINAL_ANSWER))
    result = run(lambda agent: agent.run("Weather in Paris?"))
    assert asked == ["Paris"]
    assert result.output == FINAL_ANSWER
    assert tool_outputs(fake)[-1]["output"] == weather("Paris")


def test_a_streamed_run_with_a_tool(run: Run, fake: FakeOpenAI, asked: list[str]) -> None:
    fake.queue(Plan(tool_calls=[WEATHER_CALL]), Plan(text=FINAL_ANSWER))

    async def streamed(agent: Agent[None, str]) -> list[str]:
        async with agent.run_stream("Weather in Paris?") as result:
            return [text async for text in result.stream_output(debounce_by=None)]

    pieces = run(streamed)
    assert asked == ["Paris"]
    assert pieces[-1] == FINAL_ANSWER and len(pieces) > 1
