"""Turn a request's growing token list into text deltas, honouring stop strings.

The text is always decoded from all generated tokens (`skip_special_tokens`, as `finesteer
generate`), so multi-byte characters split across tokens come out whole: a delta is held back while
the text ends in a replacement character, or while its tail could still become a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TextStream:
    """Decoded text of one request; `feed` returns the next safe-to-send piece."""

    tokenizer: Any
    stop: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    stopped: bool = False
    _text: str = ""

    def text(self) -> str:
        """The full text so far (cut before a stop string once one appeared)."""
        return self._text

    def feed(self, token: int, *, need_text: bool) -> str:
        """Add a token; returns the new text that may be sent now ('' when held back)."""
        self.tokens.append(token)
        if not need_text and not self.stop:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((at for at in (text.find(stop) for stop in self.stop) if at != -1), default=-1)
        if cut != -1:
            text, self.stopped = text[: max(cut, self.sent)], True
        self._text = text
        if self.stopped:
            return self.flush()
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    safe = min(safe, len(text) - n)
                    break
        return self._take(safe)

    def finish(self) -> str:
        """Decode everything (when text was never needed) and return what is left to send."""
        if not self.stopped:
            self._text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self.flush()

    def flush(self) -> str:
        return self._take(len(self._text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self._text[self.sent : upto]
        self.sent = upto
        return piece
