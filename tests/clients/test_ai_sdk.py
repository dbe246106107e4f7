"""The Vercel AI SDK's `openai(model)` (the Responses API): generateText and streamText with a tool.

tests/clients/node holds a small Node project with `ai` and `@ai-sdk/openai`
pinned in package-lock.json; the first test run installs it with `npm ci`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.clients.conftest import FINAL_ANSWER, MODEL, WEATHER_CALL, response_calls, tool_outputs
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan

PROJECT = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
def node_script() -> Path:
    """run.mjs, with the project's packages installed (once, or again when the lock changed)."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.skip("Node.js and npm are needed for the AI SDK tests (apt-get install nodejs npm)")
    installed = PROJECT / "node_modules" / ".package-lock.json"
    lock = PROJECT / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=PROJECT,
            check=True,
            timeout=600,
            capture_output=True,
        )
    return PROJECT / "run.mjs"


@pytest.fixture
def ai_sdk(node_script: Path, responses_base_url: str, responses_api_key: str) -> Any:
    def run(mode: str) -> dict[str, Any]:
        env = {
            **os.environ,
            "RESPONSES_BASE_URL": responses_base_url,
            "RESPONSES_API_KEY": responses_api_key,
            "RESPONSES_MODEL": MODEL,
        }
        done = subprocess.run(
            ["node", str(node_script), mode], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    return run


def test_generate_text(ai_sdk: Any, fake: FakeOpenAI) -> None:
    result = ai_sdk("generate")
    assert result["text"] == DEFAULT_TEXT
    assert result["finishReason"] == "stop"
    assert result["usage"]["outputTokens"] == fake.biller.bills[0].completion_tokens
    assert [r.path for r in response_calls(fake)] == ["/v1/responses"]


def test_stream_text(ai_sdk: Any, fake: FakeOpenAI) -> None:
    result = ai_sdk("stream")
    assert "".join(result["deltas"]) == DEFAULT_TEXT == result["text"]
    assert len(result["deltas"]) > 1
    assert result["usage"]["inputTokens"] == fake.biller.bills[0].prompt_tokens


@pytest.mark.parametrize("mode", ["tool", "stream-tool"])
def test_a_tool_is_called_and_its_result_answered(ai_sdk: Any, fake: FakeOpenAI, mode: str) -> None:
    fake.queue(Plan(tool_calls=[WEATHER_CALL]), Plan(text=FINAL_ANSWER))
    result = ai_sdk(mode)
    assert result["calls"] == [{"city": "Paris"}]
    assert result["text"] == FINAL_ANSWER
    assert result["steps"] == 2
    assert tool_outputs(fake)[-1]["call_id"] == WEATHER_CALL["call_id"]
