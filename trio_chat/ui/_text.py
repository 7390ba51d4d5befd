"""Guest-supplied strings made safe to show: every interface shows them as text.

A guest chooses their name and their messages' text; a terminal would obey an escape
sequence in them (clear the screen, rewrite a line, set a hyperlink) and Rich would
read ``[...]`` as markup. Interfaces therefore build Rich ``Text`` (never markup)
and HTML through ``html.escape``, from strings passed through :func:`printable` first.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["printable"]

# C0 controls (ESC among them), DEL, C1 controls, and the bidirectional overrides and
# isolates (which reorder what follows them on screen).
_CONTROLS: Final = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROLS_BUT_LINES: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, multiline: bool = False) -> str:
    """``text`` with each control character shown as its escape (ESC as ``\\x1b``).
    ``multiline`` keeps newlines and tabs (message text); names keep none."""
    pattern = _CONTROLS_BUT_LINES if multiline else _CONTROLS
    return pattern.sub(_visible, text)
