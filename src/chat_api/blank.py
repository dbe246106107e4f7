"""What counts as blank text: one definition for the OpenAPI pattern and the check.

Python's `str.strip()` and JSON Schema's `\\s` (ECMA-262) disagree on a few
characters: Python counts U+001C-U+001F and U+0085 as space, JSON Schema
does not; JSON Schema counts U+FEFF, Python does not. A name made of those
alone passed the documented pattern and was then refused, so both now
count all of them as blank.
"""

from __future__ import annotations

BLANKS = "".join(c for c in map(chr, range(0x3001)) if c.isspace()) + "\ufeff"
NOT_BLANK = r"[^\s\u001c-\u001f\u0085\ufeff]"  # the OpenAPI `pattern`: one character not blank


def strip_blanks(text: str) -> str:
    return text.strip(BLANKS)
