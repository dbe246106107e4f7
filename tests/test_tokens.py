"""The prompt bound: never below what OpenAI can bill, its text never above the model's context."""

from __future__ import annotations

import base64
import time
import zlib
from typing import Any

import pytest

from chat_api import tokens
from chat_api.catalog import UNKNOWN_IMAGE_TOKENS, image_tokens, model_info
from chat_api.tokens import IMAGE_MARKER_TOKENS, MAX_PDF_PAGES, PDF_SCAN_BYTES
from tests.fakes.billing import billed_tokens, prompt_tokens


def prompt_bound(body: dict[str, Any], window: int) -> int:
    """The bound as the operations ask for it: with the image figure of the model named."""
    return tokens.prompt_bound(body, window, image_tokens(body.get("model")))


MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "gpt-4.1-nano", "o4-mini", "o1", "gpt-4")


def _body(model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def _image(detail: str = "high") -> dict[str, Any]:
    url = "data:image/png;base64," + "A" * 100_000
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def _pdf(pages: int, between: bytes = b" ") -> bytes:
    """A PDF of `pages` pages whose page objects write `between` between /Type and /Page."""
    kids = b" ".join(b"%d 0 R" % (3 + i) for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
        *[b"<< /Type" + between + b"/Page /Parent 2 0 R >>" for _ in range(pages)],
    ]
    body = b"".join(b"%d 0 obj\n%s\nendobj\n" % (i + 1, o) for i, o in enumerate(objects))
    return b"%PDF-1.4\n" + body + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"


def _with_file(raw: bytes, model: str = "gpt-4o") -> dict[str, Any]:
    data = "data:application/pdf;base64," + base64.b64encode(raw).decode()
    part = {"type": "file", "file": {"filename": "a.pdf", "file_data": data}}
    return _body(model, messages=[{"role": "user", "content": [part]}])


@pytest.mark.parametrize("model", MODELS)
def test_the_bound_covers_the_fakes_hostile_billing_for_every_part_type(model: str) -> None:
    window = model_info(model).context_window
    bodies = [
        _body(model),
        _body(model, messages=[{"role": "user", "content": "日本語 🎉 " * 500}]),
        _body(model, tools=[{"type": "function", "function": {"description": "d" * 9000}}]),
        _body(model, response_format={"type": "json_schema", "json_schema": {"a": "b" * 700}}),
        _body(model, messages=[{"role": "user", "content": [{"type": "text", "text": "x"}]}]),
        _body(model, messages=[{"role": "user", "content": [_image(), _image("low")] * 20}]),
        _with_file(_pdf(12, b"\n"), model),
        # Text that fills the window, and images billed on top of it.
        _body(model, messages=[{"role": "user", "content": ["x" * (window - 2000), _image()]}]),
    ]
    for body in bodies:
        if prompt_tokens(body) <= window:  # a longer prompt is refused, unbilled
            assert prompt_bound(body, window) >= billed_tokens(body), body["messages"][0]


def test_images_count_at_their_models_worst_not_by_their_base64() -> None:
    """gpt-4o-mini bills an image at 2,833 + 5,667 a tile: 48,169 at 8 tiles, 33 x gpt-4o's."""
    assert image_tokens("gpt-4o-mini") == 48_169 == image_tokens("gpt-4o-mini-2024-07-18")
    assert image_tokens("gpt-4o") == 1_445
    assert image_tokens("gpt-4.1-mini") == 2_489  # 1,536 patches x 1.62
    assert image_tokens("o4-mini") == 2_642  # x 1.72
    for model in ("gpt-4o", "gpt-4o-mini"):
        body = _body(model, messages=[{"role": "user", "content": [_image("low")]}])
        assert prompt_bound(body, 128_000) - prompt_bound(_body(model), 128_000) < (
            image_tokens(model) + IMAGE_MARKER_TOKENS + 100
        )
        assert prompt_bound(body, 128_000) >= image_tokens(model)


def test_a_model_not_listed_or_not_named_gets_the_largest_image_figure() -> None:
    assert image_tokens("gpt-4o-mini") == UNKNOWN_IMAGE_TOKENS
    assert image_tokens("gpt-4o-mini-search-preview") == UNKNOWN_IMAGE_TOKENS
    assert image_tokens(None) == UNKNOWN_IMAGE_TOKENS
    body = {"messages": [{"role": "user", "content": [_image()]}]}  # the default model answers
    assert prompt_bound(body, 128_000) >= UNKNOWN_IMAGE_TOKENS


def test_images_are_billed_on_top_of_the_context_window() -> None:
    body = _body(
        "gpt-4o-mini", messages=[{"role": "user", "content": ["x" * 500_000, *[_image()] * 3]}]
    )
    assert prompt_bound(body, 128_000) == 128_000 + 3 * (48_169 + IMAGE_MARKER_TOKENS)


@pytest.mark.parametrize(
    "between",
    [b" ", b"", b"\n", b"\t", b"   ", b"\r\n", b"\x0c", b" %a comment\n ", b"%\r"],
    ids=repr,
)
def test_pdf_pages_are_found_whatever_pdf_whitespace_is_between_type_and_page(
    between: bytes,
) -> None:
    raw = _pdf(7, between).replace(b"/Count 7", b"/Count 1")  # the count lies: objects win
    assert prompt_bound(_with_file(raw), 1_000_000) >= len(raw) + 7 * 1_445
    # `/Pages` (the page tree) is not a page: 7 pages, not 8.
    assert prompt_bound(_with_file(raw), 1_000_000) < len(raw) + 8 * 1_445


def test_pdf_names_written_with_hex_escapes_are_pages_too() -> None:
    raw = _pdf(5).replace(b"/Type /Page /Parent", b"/Ty#70e /P#61ge /Parent")
    assert prompt_bound(_with_file(raw), 1_000_000) >= len(raw) + 5 * 1_445


@pytest.mark.parametrize("leaf", [b"/Type /Page_", b"/Type\x0b/Page", b""], ids=repr)
def test_a_pdf_counts_every_leaf_of_its_page_tree_whatever_its_type_says(leaf: bytes) -> None:
    """A renderer takes every leaf under `/Kids` for a page: a hostile PDF whose leaves say
    nothing (or something else) and whose `/Count` lies still has ten pages.

    Before: no page found, one counted, and ten billed ($0.072 on a $0.05 budget).
    """
    raw = _pdf(10).replace(b"/Count 10", b"/Count 1").replace(b"/Type /Page /Parent", leaf)
    assert b"/Type /Page " not in raw
    assert prompt_bound(_with_file(raw), 1_000_000) >= len(raw) + 10 * 1_445
    packed = raw.replace(b"] /Count", b"]/Count").replace(b" 0 R ", b" 0 R\n")
    assert prompt_bound(_with_file(packed), 1_000_000) >= len(packed) + 10 * 1_445
    # A comment inside the array, and the array kept as an object of its own (`/Kids 99 0 R`).
    commented = raw.replace(b"/Kids [3 0 R ", b"/Kids [3 0 R %]\n ")
    assert prompt_bound(_with_file(commented), 1_000_000) >= len(commented) + 10 * 1_445
    kids = raw.split(b"/Kids ", 1)[1].split(b"]", 1)[0] + b"]"
    elsewhere = raw.replace(b"/Kids " + kids, b"/Kids 99 0 R").replace(
        b"trailer", b"99 0 obj\n" + kids + b"\nendobj\ntrailer"
    )
    assert prompt_bound(_with_file(elsewhere), 1_000_000) >= len(elsewhere) + 10 * 1_445


def test_reading_a_hostile_pdf_takes_linear_time() -> None:
    """Unclosed arrays, endless digits, references or comments: each read once (the 2 MB
    limit does the rest)."""
    hostile = (
        b"/Kids [" * 250_000,
        b"/Kids [" + b"1" * 1_900_000,
        b" R" * 900_000,
        b"/Kids 1 0 R " + b"1 0 obj [ %" * 150_000,
        b"/Kids 1 0 R " + b"1 " * 900_000,
        b"/Kids 1 0 R 1 0 obj [" + b"%]\n" * 500_000,
        b"/Type %" * 280_000,  # before: a comment to the end of the file read from every
        b"/Count %" * 240_000,  # `/Type`, about ten minutes of event loop for one request
        b"/Kids [ %" * 200_000,
    )
    for raw in hostile:
        started = time.perf_counter()
        prompt_bound(_with_file(b"%PDF-1.4\n" + raw), 1_000_000)
        # About 0.1 s each on a 2-core VM; a scan that backtracked would take minutes.
        assert time.perf_counter() - started < 10.0


def test_a_pdf_counts_its_largest_page_count_when_page_objects_say_fewer() -> None:
    raw = _pdf(2).replace(b"/Count 2", b"/Count 40")
    assert prompt_bound(_with_file(raw), 1_000_000) >= len(raw) + 40 * 1_445


def test_a_pdf_with_compressed_object_streams_counts_as_openais_most_pages() -> None:
    """Page objects inside an /ObjStm are compressed: only OpenAI can count them."""
    raw = _pdf(1) + b"9 0 obj\n<< /Type /ObjStm /N 50 /Filter /FlateDecode >>\nendobj\n"
    page = image_tokens("gpt-4o-mini")
    assert prompt_bound(_with_file(raw, "gpt-4o-mini"), 128_000) >= MAX_PDF_PAGES * page
    raw = _pdf(1) + b"9 0 obj\n<< /Type /XRef /W [1 2 1] >>\nendobj\n"
    assert prompt_bound(_with_file(raw), 128_000) >= MAX_PDF_PAGES * 1_445


def test_a_pdf_too_large_to_read_quickly_counts_as_openais_most_pages() -> None:
    """Reading a hostile one costs the event loop about 55 ms a MB: past 4 MB it is not read."""
    raw = _pdf(1) + b" " * PDF_SCAN_BYTES
    assert prompt_bound(_with_file(raw), 10_000_000) >= len(raw) + MAX_PDF_PAGES * 1_445
    small = _pdf(1) + b" " * (PDF_SCAN_BYTES // 2)
    assert prompt_bound(_with_file(small), 10_000_000) < len(small) + 2 * 1_445


def test_pdfs_past_the_scan_limit_together_count_as_openais_most_pages() -> None:
    """Several files under the limit each: what is read is bounded by request, not by file."""
    raw = _pdf(1) + b" " * (PDF_SCAN_BYTES // 2)
    part = _with_file(raw)["messages"][0]["content"][0]  # one file part, sent three times
    body = _body(messages=[{"role": "user", "content": [part] * 3}])
    assert prompt_bound(body, 10_000_000) >= 3 * len(raw) + MAX_PDF_PAGES * 1_445


def test_a_file_whose_text_is_compressed_counts_the_whole_context() -> None:
    """A PDF's filtered content stream, or a .docx, holds far more text than its bytes."""
    text = b"BT (" + b"many words " * 20_000 + b") Tj ET"
    squeezed = zlib.compress(text, 9)
    stream = b"4 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(squeezed)
    raw = _pdf(1) + stream + squeezed + b"\nendstream\nendobj\n"
    assert len(raw) < len(text) // 50  # the file is small, its text is not
    assert prompt_bound(_with_file(raw), 128_000) >= 128_000  # what the model can read of it
    docx = b"PK\x03\x04" + zlib.compress(text, 9)
    assert prompt_bound(_with_file(docx), 128_000) >= 128_000
    plain = _pdf(1)  # nothing compressed: its bytes bound its text
    assert prompt_bound(_with_file(plain), 128_000) < 10_000


def test_a_file_sent_by_id_counts_the_whole_context_and_the_most_pages() -> None:
    by_id = {"type": "file", "file": {"file_id": "file-123"}}
    body = _body(messages=[{"role": "user", "content": [by_id]}])
    assert prompt_bound(body, 128_000) == 128_000 + MAX_PDF_PAGES * 1_445
    url = {"type": "input_file", "file_url": "https://example.com/a.pdf"}
    body = {"model": "gpt-4o-mini", "input": [{"role": "user", "content": [url]}]}
    assert prompt_bound(body, 128_000) == 128_000 + MAX_PDF_PAGES * 48_169


def test_text_never_passes_the_context_window_and_costs_no_image_when_there_is_none() -> None:
    body = _body(messages=[{"role": "user", "content": "x" * 500_000}])
    assert prompt_bound(body, 128_000) == 128_000
    assert prompt_bound(_body(messages=[{"role": "user", "content": "x" * 1000}]), 128_000) < 1100
