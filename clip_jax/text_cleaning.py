"""What of a text a tokenizer row reads, and how it is cleaned first.

A row of context_length L reads at most `max_text_characters(L)` (64 L) characters of a text; a
text that long or shorter is encoded exactly as open_clip encodes it. With truncate=True a longer
text loses its leading whitespace and is cut to that many characters (at a space when there is
one) before cleaning, so the cost of a row is bounded whatever the length of its text.
`clean_clip_text` is OpenAI's normalisation (ftfy, HTML unescaping, whitespace, lowercase).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import ftfy
import regex

_WHITESPACE_RUN = regex.compile(r"\s+")

# How many characters of a text one row may read, per position of its context. The longest CLIP
# token is 32 bytes and an ordinary caption needs about 5 characters per token, so a text longer
# than 64 characters per position fits only if most of it vanishes in cleaning (whitespace runs,
# control characters, HTML entities). ftfy's cost grows with the length of a text (a character can
# take it a line of work), so this also bounds the cleaning of one text.
TEXT_CHARACTERS_PER_POSITION = 64

# html.unescape turns a decimal reference into int(digits), which raises for more than 4,300
# digits (Python's limit on int from str); such references are shortened to the same value first.
_LONG_DECIMAL_REFERENCE = regex.compile(r"&#([0-9]{8,})")
_LAST_SPACE = regex.compile(r"\s", flags=regex.REVERSE)  # searches from the end of the window
_LEADING_WHITESPACE = regex.compile(r"\s*")

TextBatch = str | bytes | Sequence[str | bytes]


def collapse_whitespace(text: str) -> str:
    return _WHITESPACE_RUN.sub(" ", text).strip()


def _short_decimal_reference(match: regex.Match) -> str:
    # The same code point: leading zeros dropped; any value over 7 digits is above U+10FFFF,
    # which html.unescape turns into U+FFFD whatever its digits, like 9999999.
    digits = match.group(1).lstrip("0") or "0"
    return "&#" + (digits if len(digits) <= 7 else "9999999")


def _unescape_html(text: str) -> str:
    if "&#" in text:
        text = _LONG_DECIMAL_REFERENCE.sub(_short_decimal_reference, text)
    return html.unescape(text)


def clean_clip_text(text: str) -> str:
    """OpenAI's normalisation: repair mojibake, unescape HTML twice (captions are often
    double-escaped), collapse whitespace, lowercase. transformers' CLIPTokenizer does only the last
    two, so texts passed through this first tokenize there as here (docs/conversion.md)."""
    text = ftfy.fix_text(text)
    text = _unescape_html(_unescape_html(text))
    return collapse_whitespace(text).lower()


def max_text_characters(context_length: int) -> int:
    """The most characters of one text that a row of `context_length` ids is encoded from; texts up
    to this length are encoded exactly, longer ones are cut (truncate=True) or refused."""
    return TEXT_CHARACTERS_PER_POSITION * int(context_length)


def _cut_text(text: str, limit: int) -> str:
    """At most `limit` characters from the start of the text after its leading whitespace, ending
    before a whitespace character in the second half of the window if there is one (so that no
    word is cut)."""
    start = _LEADING_WHITESPACE.match(text).end()
    if len(text) - start <= limit:
        return text[start:]
    end = start + limit
    space = _LAST_SPACE.search(text, start + limit // 2, end + 1)
    return text[start : space.start() if space is not None else end]


def readable_text(text: str, context_length: int, truncate: bool) -> str:
    """The text itself if it is short enough to be read whole; else its cut (truncate) or an error."""
    limit = max_text_characters(context_length)
    if len(text) <= limit:
        return text
    if not truncate:
        raise ValueError(
            f"text {shorten(text)!r} is {len(text)} characters long, more than the {limit} a row of "
            f"context_length={context_length} reads; shorten it or pass truncate=True"
        )
    return _cut_text(text, limit)


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def as_text_list(texts: TextBatch) -> list[str]:
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    result = []
    for index, text in enumerate(texts):
        if isinstance(text, bytes):  # tf.data and grain hand strings over as UTF-8 bytes
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"texts[{index}] is not UTF-8: byte 0x{text[error.start]:02x} at position {error.start} "
                    f"({error.reason}) in {shorten(repr(text))}"
                ) from None
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is a {type(text).__name__} ({text!r}); expected str")
        result.append(text)
    return result
