"""The prompt bound: never below what OpenAI can bill, never above the model's context."""

from __future__ import annotations

import base64
from typing import Any

from chat_api.tokens import IMAGE_TOKENS, prompt_bound
from tests.fakes.billing import prompt_tokens


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_the_bound_covers_the_fakes_hostile_billing_for_every_part_type() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    bodies = [
        _body(),
        _body(messages=[{"role": "user", "content": "日本語 🎉 " * 500}]),
        _body(tools=[{"type": "function", "function": {"name": "f", "description": "d" * 9000}}]),
        _body(response_format={"type": "json_schema", "json_schema": {"schema": {"a": "b" * 700}}}),
        _body(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, image]}]),
    ]
    for body in bodies:
        assert prompt_bound(body, 1_000_000) >= prompt_tokens(body)


def test_images_count_at_their_worst_not_by_their_base64() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 3_000_000}}
    body = _body(messages=[{"role": "user", "content": [image]}])
    assert IMAGE_TOKENS <= prompt_bound(body, 1_000_000) < IMAGE_TOKENS + 100


def test_a_pdf_counts_its_bytes_and_an_image_a_page_and_a_file_by_id_the_whole_context() -> None:
    pdf = b"%PDF-1.4 /Type /Pages /Type /Page /Type /Page /Type /Page"
    part = {"type": "file", "file": {"file_data": base64.b64encode(pdf).decode()}}
    body = _body(messages=[{"role": "user", "content": [part]}])
    assert prompt_bound(body, 1_000_000) >= len(pdf) + 3 * IMAGE_TOKENS
    by_id = {"type": "file", "file": {"file_id": "file-123"}}
    body = _body(messages=[{"role": "user", "content": [by_id]}])
    assert prompt_bound(body, 128_000) == 128_000


def test_the_bound_never_passes_the_context_window() -> None:
    body = _body(messages=[{"role": "user", "content": "x" * 500_000}])
    assert prompt_bound(body, 128_000) == 128_000
