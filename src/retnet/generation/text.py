"""TextStream: the text of a growing token sequence, released as it becomes safe to show, and
cut at the first stop string. The one text-streaming helper: `retnet generate`, the server's
engine, the evaluator's generate_until and generate_stream's stop check all use it."""

from __future__ import annotations

from collections.abc import Sequence

from retnet.tokenizer import Tokenizer

# What a decoder makes of bytes that do not (yet) form a whole UTF-8 character.
REPLACEMENT = "\ufffd"


class TextStream:
    """Push tokens one at a time; each push returns the text that is now safe to show.

        text = TextStream(tokenizer, stop=["\\n\\n"])
        for token in tokens:
            print(text.push(token), end="")
            if text.stopped:
                break
        print(text.finish())

    Held back until a later token settles them: an unfinished UTF-8 character (the decoded
    text ends in U+FFFD) and any suffix that could grow into a stop string. At a stop string
    the text is cut before its earliest occurrence and `stopped` becomes True; the stop
    string itself is never released, and tokens pushed after it are ignored.

    The text is always exactly `decode(ids)`. For a tokenizer whose decoding concatenates at
    character boundaries (`concatenates`: bytes, byte-level BPE) only the tokens after the
    last settled boundary are decoded at each push, so a long generation costs O(1) per
    token; any other tokenizer (a decoder may join or strip spaces at token boundaries) is
    decoded whole at every push."""

    FOLD = 16  # tokens decoded again at most, past the last settled boundary

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []  # every token pushed before the stop, the stopping one too
        self.sent = 0  # characters of the decoded text already released
        self.stopped = False
        self._fold = bool(getattr(tokenizer, "concatenates", False))
        self._settled, self._settled_text = 0, ""  # decode(ids[:settled]), complete chars

    def _text(self) -> str:
        """decode(ids), decoding only what follows the settled prefix."""
        tail = self.tokenizer.decode(self.ids[self._settled:])
        text = self._settled_text + tail
        # A tail without an unfinished (or invalid) character ends on a character boundary:
        # the text so far is final whatever comes next, so it need not be decoded again.
        if self._fold and len(self.ids) - self._settled >= self.FOLD and REPLACEMENT not in tail:
            self._settled, self._settled_text = len(self.ids), text
        return text

    def push(self, token: int) -> str:
        """Add one token; return the newly released text ("" when nothing is safe yet)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self._text()
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._release(text, cut)
        return self._release(text, min(self._complete(text), self._clear_of_stops(text)))

    def finish(self) -> str:
        """The text still held back (nothing after a stop string): the sequence has ended."""
        if self.stopped:
            return ""
        text = self._text()
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        delta = text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts in text, or None. Only the unreleased tail
        is searched (plus the stop's length, for text that a later token re-decoded)."""
        found = [text.find(s, max(0, self.sent - len(s))) for s in self.stop]
        return min((at for at in found if at >= 0), default=None)

    @staticmethod
    def _complete(text: str) -> int:
        """The length of text without its trailing unfinished characters."""
        return len(text.rstrip(REPLACEMENT)) if text.endswith(REPLACEMENT) else len(text)

    def _clear_of_stops(self, text: str) -> int:
        """The length of text without its longest suffix that begins a stop string."""
        safe = len(text)
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return safe
