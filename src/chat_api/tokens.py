"""Token counts the gateway works out itself, before or without the upstream's.

Two kinds, never mixed up:

- **Bounds** (`prompt_bound`), for money: the most the upstream can bill for
  reading a request. OpenAI's tokenizer works on bytes, so a token never
  covers less than one UTF-8 byte of text: counting every byte of every
  string the model reads (messages, tools, schemas, instructions, the keys
  and punctuation of the JSON they are written in) can only err on the
  operator's side, whatever a hostile client sends. Files and audio count by
  their size; a file sent by id (size unknown here), or one whose text is
  compressed (a PDF with filtered streams, a .docx), as the model's whole
  context. That text never passes the model's context window: OpenAI refuses
  a longer prompt unbilled. Images, and the image OpenAI makes of each page
  of a PDF, are billed on top of it, each at the model's worst by OpenAI's
  rules (the model's `image_tokens`: 48,169 for a gpt-4o-mini image); a PDF whose
  pages cannot be counted here (sent by id, or with compressed object
  streams) counts as OpenAI's most pages in one request.
- **Estimates** (`estimate_prompt_tokens`, `tokens_for_chars`), for what a
  person reads (the demo's usage, a simple-API answer without usage): about
  four characters a token, as for English.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3
# The tokens that mark an image's place in the prompt, on top of the image itself.
IMAGE_MARKER_TOKENS = 16
# OpenAI reads at most 100 pages of PDF in one request, across all its files.
MAX_PDF_PAGES = 100
PDF_SCAN_BYTES = 2 * 1024 * 1024  # files read for pages, a request; past it, MAX_PDF_PAGES
ZIP_MAGIC = b"PK\x03\x04"  # .docx, .xlsx, .pptx: compressed text


def _pdf_name(word: bytes) -> bytes:
    """A regex for the PDF name `/word`, each letter also as its `#xx` escape (`/Ty#70e`)."""
    letters = b"".join(
        b"(?:%s|#%s[%s%s])" % (bytes([c]), b"%X" % (c >> 4), b"%X" % (c & 15), b"%x" % (c & 15))
        for c in word
    )
    return b"/" + letters + rb"(?![^\x00\t\n\x0c\r ()<>\[\]{}/%])"


# PDF whitespace, which may stand between any two tokens (possessive: read once). Comments
# may too: the patterns are also run on the text with its comments taken out (`_pdf_pages`),
# as a pattern that skipped them itself would read a comment running to the end of a
# hostile file again from every place a match could start, in quadratic time.
_PDF_SPACE = rb"[\x00\t\n\x0c\r ]*+"
_PDF_COMMENT = re.compile(rb"%[^\r\n]*+")
_PDF_PAGE = re.compile(_pdf_name(b"Type") + _PDF_SPACE + _pdf_name(b"Page"))
_PDF_COUNT = re.compile(_pdf_name(b"Count") + _PDF_SPACE + rb"\+?0*(\d{1,9})")
# The page tree's `/Kids [3 0 R 4 0 R ...]`: a renderer takes every leaf for a page, whatever
# its `/Type` says, so every reference in a Kids array counts (its inner nodes too: errs high).
# Given in place, or as a reference to an array object (`/Kids 3 0 R`).
_PDF_ARRAY = rb"\[([^\[\]]*+)\]"
_PDF_KIDS = re.compile(_pdf_name(b"Kids") + _PDF_SPACE + _PDF_ARRAY)
_PDF_NUMBERS = rb"(?<!\d)(\d{1,10})[\x00\t\n\x0c\r ]++(\d{1,5})[\x00\t\n\x0c\r ]"
_PDF_KIDS_ELSEWHERE = re.compile(_pdf_name(b"Kids") + _PDF_SPACE + _PDF_NUMBERS + rb"*+R")
_PDF_ARRAY_OBJECT = re.compile(_PDF_NUMBERS + rb"++obj" + _PDF_SPACE + _PDF_ARRAY)
_PDF_REFERENCE = re.compile(rb"(?<![^\x00\t\n\x0c\r \d])R")  # `3 0 R`: its R, in linear time
# Objects packed in compressed streams (found through an xref stream) cannot be seen here.
_PDF_HIDDEN = re.compile(_pdf_name(b"ObjStm") + b"|" + _pdf_name(b"XRef") + b"|/XRefStm")


# Request fields the model does not read: settings of the call, not its prompt.
NOT_READ = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "user",
        "store",
        "metadata",
        "background",
        "service_tier",
        "parallel_tool_calls",
        "previous_response_id",
        "conversation",
        "include",
        "truncation",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "prompt_cache_key",
        "safety_identifier",
        "encoding_format",
        "dimensions",
        "modalities",
        "reasoning_effort",
    }
)


# Parts OpenAI reads as an image: a picture sent, a computer-use screenshot, an image a
# response made (its stored context shows it to the model again).
IMAGE_PARTS = frozenset(
    {"image_url", "input_image", "computer_screenshot", "image_generation_call"}
)


class _Media:
    """What a request shows the model besides text: billed past the context window.

    Class attributes as defaults, so that a call without any costs no more than this.
    """

    images = 0
    pages = 0
    scanned = 0  # bytes of files looked through for pages, in the whole request
    uncounted = False  # a PDF whose pages cannot be counted here
    whole_context = False  # a file whose text cannot be measured here

    def parts(self) -> tuple[int, int]:
        """The images, and the PDF pages (OpenAI's most for a PDF that cannot be counted)."""
        return self.images, max(self.pages, MAX_PDF_PAGES) if self.uncounted else self.pages


def prompt_bound(
    body: dict[str, Any], context_window: int, image_tokens: int, *, whole_context: bool = False
) -> int:
    """The most the upstream can bill for reading `body` (see the module docstring)."""
    return measure(body, context_window, image_tokens, whole_context=whole_context)[0]


def measure(
    body: dict[str, Any], context_window: int, image_tokens: int, *, whole_context: bool = False
) -> tuple[int, int]:
    """`prompt_bound`, and how many images and PDF pages `body` holds (`media_parts`).

    `whole_context`: the request continues stored context, which may fill the
    window by itself; its own images and PDF pages still count on top.
    """
    messages = body.get("messages")
    total = TOKENS_PER_REPLY
    if isinstance(messages, list):
        total += TOKENS_PER_MESSAGE * len(messages)
    media = _Media()
    for name, value in body.items():
        if name not in NOT_READ:
            total += len(name) + _bound(value, media)
    text = context_window if whole_context or media.whole_context else min(total, context_window)
    if not (media.images or media.pages or media.uncounted):
        return text, 0
    images, pages = media.parts()
    bound = text + images * (image_tokens + IMAGE_MARKER_TOKENS) + pages * image_tokens
    return bound, images + pages


def media_parts(value: Any) -> int:
    """The images and PDF pages in `value` (items, a message, a whole body)."""
    media = _Media()
    _bound(value, media)
    images, pages = media.parts()
    return images + pages


def stored_media_tokens(parts: int, image_tokens: int) -> int:
    """What reading `parts` images and PDF pages again, in stored context, can be billed."""
    return parts * (image_tokens + IMAGE_MARKER_TOKENS)


def _bound(value: Any, media: _Media) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in IMAGE_PARTS:
            media.images += 1
            return 0
        if kind in ("file", "input_file"):
            return _file_bound(value.get("file", value), media)
        if kind == "input_audio":
            audio = value.get("input_audio")
            return len(str(audio.get("data", ""))) if isinstance(audio, dict) else 0
        # Each key and a token of punctuation per entry: the JSON the model is shown.
        return sum(len(key) + 1 + _bound(item, media) for key, item in value.items())
    if isinstance(value, list):
        return sum(1 + _bound(item, media) for item in value)
    if value is None or isinstance(value, bool):
        return 1
    return len(str(value))


def _file_bound(file: Any, media: _Media) -> int:
    """A file's text (at most a token per byte); a PDF's pages are counted into `media`."""
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str):
        # Sent by id or by URL: only the upstream knows its size and its pages.
        media.whole_context = media.uncounted = True
        return 0
    encoded = data.partition("base64,")[2] or data
    try:
        raw = base64.b64decode(encoded, validate=False)
    except (binascii.Error, ValueError):
        media.uncounted = True
        return len(data)
    if raw.startswith(ZIP_MAGIC) or b"/Filter" in raw:
        # Compressed (a PDF's content streams, a .docx): its text may be far more than
        # its bytes, up to what the model reads.
        media.whole_context = True
    media.pages += _pdf_pages(raw, media)
    return len(raw)


def _pdf_pages(raw: bytes, media: _Media) -> int:
    """The most pages a PDF can have by what is visible in it: its page objects, its counts,
    or the references in its page tree.

    Past `PDF_SCAN_BYTES` read in the request, files count as OpenAI's most pages,
    unread: on a hostile file the scans take about 55 ms a MB of the event loop.
    """
    media.scanned += len(raw)
    if media.scanned > PDF_SCAN_BYTES:
        media.uncounted = True
        return 0
    if _PDF_HIDDEN.search(raw):
        media.uncounted = True
    # Read as it is, and without its comments: a comment may stand between any two tokens,
    # and a `%` inside a string, which starts none, would take out the rest of its line.
    return max(_visible_pages(raw), _visible_pages(_PDF_COMMENT.sub(b" ", raw)))


def _visible_pages(raw: bytes) -> int:
    """The most of: page objects, `/Count`s, and references in the page tree."""
    objects = sum(1 for _ in _PDF_PAGE.finditer(raw))
    counts = (int(count) for count in _PDF_COUNT.findall(raw))
    return max(objects, _page_tree_references(raw), max(counts, default=0))


def _page_tree_references(raw: bytes) -> int:
    """Every reference in the page tree's `/Kids` arrays (its inner nodes too: errs high)."""
    total = sum(len(_PDF_REFERENCE.findall(found)) for found in _PDF_KIDS.findall(raw))
    elsewhere = set(_PDF_KIDS_ELSEWHERE.findall(raw))
    if elsewhere:
        for number, generation, found in _PDF_ARRAY_OBJECT.findall(raw):
            if (number, generation) in elsewhere:
                total += len(_PDF_REFERENCE.findall(found))
    return total


def tokens_for_chars(chars: int) -> int:
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def estimate_text_tokens(text: str) -> int:
    return tokens_for_chars(len(text))


def estimate_prompt_tokens(messages: Any) -> int:
    """About how many tokens a person would count in `messages` (not for money)."""
    if not isinstance(messages, list):
        return TOKENS_PER_REPLY
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += estimate_text_tokens(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += estimate_text_tokens(part["text"])
                else:
                    total += 85  # an image or other part: OpenAI's low-detail cost
        calls = message.get("tool_calls")
        if calls:
            total += estimate_text_tokens(str(calls))
    return total
