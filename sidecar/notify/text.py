"""Text helpers for Discord: length as Discord limits it, clean cutting, markdown and mentions.

Discord states its limits in characters. We count UTF-16 code units, which is never less than
the number of code points, so a text within our count is within Discord's whichever way it
counts, and a cut never falls inside a surrogate pair because we cut between code points.
"""

from __future__ import annotations

import re

ELLIPSIS = "…"
ZERO_WIDTH_SPACE = "\u200b"

# Characters that start or end Discord markdown (bold, italics, strike, code, spoiler, quote,
# headings, masked links); a backslash before any of them shows it literally. Parentheses
# are left alone: without an unescaped bracket before them they cannot form a link.
_MARKDOWN = re.compile(r"([\\*_~`|>#\[\]<])")
# Everything that could become a mention if Discord parsed it: @everyone, @here, <@id>,
# <@!id>, <@&id>, <#id>, and slash-command mentions </name:id>.
_MENTION = re.compile(r"@(everyone|here)|<([@#/])", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029]+")


def text_length(text: str) -> int:
    """Length in UTF-16 code units: an upper bound of what Discord counts."""
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def neutralise_mentions(text: str) -> str:
    """Insert a zero-width space so that no mention in ``text`` can ever resolve."""
    return _MENTION.sub(
        lambda m: (
            f"@{ZERO_WIDTH_SPACE}{m.group(1)}" if m.group(1) else f"<{ZERO_WIDTH_SPACE}{m.group(2)}"
        ),
        text,
    )


def escape_markdown(text: str) -> str:
    """Show ``text`` literally in Discord: markdown escaped, mentions and controls disarmed.

    Carriage returns are dropped (a CR/LF pair becomes a line feed) and other control
    characters are removed; line feeds stay, since descriptions may span lines.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    return neutralise_mentions(_MARKDOWN.sub(r"\\\1", text))


def single_line(text: str) -> str:
    """Collapse line breaks into spaces, for titles, field names and headers."""
    return _LINE_BREAKS.sub(" ", text).strip()


def clip(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` UTF-16 units, ending with an ellipsis when cut.

    The cut never leaves a dangling escape backslash (which would escape the ellipsis), and
    an unclosed code block is closed, so the rest of the message is not swallowed by it.
    """
    if text_length(text) <= limit:
        return text
    if limit <= 0:
        return ""
    budget = limit - len(ELLIPSIS)
    kept = _drop_dangling_escape(_cut(text, budget))
    if kept.count("```") % 2:
        closing = "\n```"
        kept = _drop_dangling_escape(_cut(kept, budget - len(closing)))
        if kept.count("```") % 2:
            return kept + ELLIPSIS + closing
    return kept + ELLIPSIS


def _cut(text: str, budget: int) -> str:
    used = 0
    for index, char in enumerate(text):
        used += 2 if ord(char) > 0xFFFF else 1
        if used > budget:
            return text[:index]
    return text


def _drop_dangling_escape(text: str) -> str:
    trailing = len(text) - len(text.rstrip("\\"))
    if trailing % 2:
        text = text[:-1]
    # A cut right after a zero-width space would leave half of a disarmed mention: harmless,
    # but a dangling "<" or "@" before it reads oddly, so drop the pair.
    if text.endswith(ZERO_WIDTH_SPACE):
        text = text[:-2]
    return text
