"""What counts as blank text: one definition for the OpenAPI pattern and the check.

Python's `str.strip()` and JSON Schema's `\\s` (ECMA-262) disagree on a few
characters: Python counts U+001C-U+001F and U+0085 as space, JSON Schema
does not; JSON Schema counts U+FEFF, Python does not. A name made of those
alone passed the documented pattern and was then refused, so both now
count all of them as blank.
"""

from __future__ import annotations

# Every character `str.isspace()` counts, then U+FEFF.
BLANKS = (
    "\x09\x0a\x0b\x0c\x0d\x1c\x1d\x1e\x1f\x20\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
    "\ufeff"
)
NOT_BLANK = r"[^\s\u001c-\u001f\u0085\ufeff]"  # the OpenAPI `pattern`: one character not blank


def strip_blanks(text: str) -> str:
    return text.strip(BLANKS)
