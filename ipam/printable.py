"""Text read from the cluster (pool and reservation names, podrefs, holder identities, lease fields),
made safe to print on an operator's terminal: control and format characters (escape sequences, bidi
overrides, line breaks) shown escaped, each word and the whole line cut to a bounded length. The JSON
outputs need none of this (json.dumps escapes them)."""

from __future__ import annotations

import re
import unicodedata

MAX_WORD = 256
MAX_LINE = 4096
_LONG_WORD = re.compile(rf"\S{{{MAX_WORD + 1},}}")


def _char(c: str) -> str:
    if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
        return c
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def _cut_word(match: re.Match[str]) -> str:
    return f"{match.group()[:MAX_WORD]}...({len(match.group())} characters)"


def printable(text: str) -> str:
    """`text` with every control or invisible format character escaped and long words and lines cut."""
    size = len(text)
    text = text if size <= MAX_LINE else text[:MAX_LINE]
    if not text.isprintable():
        text = "".join(map(_char, text))
    text = _LONG_WORD.sub(_cut_word, text)
    return text if size <= MAX_LINE else f"{text}...({size} characters)"
