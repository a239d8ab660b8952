"""Pure text bookkeeping for one generated sequence: incremental detokenisation and stop strings.

A stop string may span several tokens, and a stream must never show the first half of one, so
text is released only up to the point where no stop string could still be starting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def find_stop(text: str, stops: list[str], search_from: int = 0) -> int | None:
    """Index of the earliest stop string that starts at or after `search_from`, else None."""
    best: int | None = None
    for stop in stops:
        at = text.find(stop, search_from)
        if at != -1 and (best is None or at < best):
            best = at
    return best


def holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string, and so must wait."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


@dataclass
class TextState:
    """Text of one sequence so far, and how much of it the client has already been sent.

    Decoding re-decodes a short window of recent tokens (as vLLM's incremental detokenizer does)
    because a byte-level BPE token can end in the middle of a UTF-8 character.
    """

    stops: list[str]
    include_stop: bool = False  # vLLM's include_stop_str_in_output: the text ends with the stop string
    skip_special: bool = True  # vLLM's skip_special_tokens
    text: str = ""
    sent: int = 0
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def add_token(self, decoder: Decoder, token_id: int) -> None:
        self.token_ids.append(token_id)
        skip = self.skip_special
        prefix = decoder.decode(self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        full = decoder.decode(self.token_ids[self.prefix_offset :], skip_special_tokens=skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return  # an unfinished character: wait for the next token
        self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)

    def check_stop(self, new_chars: int) -> bool:
        """Cuts the text at a stop string found in the last `new_chars` characters (or that
        ends there); returns True when the sequence should stop."""
        if not self.stops:
            return False
        longest = max(len(s) for s in self.stops)
        start = max(0, len(self.text) - new_chars - longest + 1)
        at = find_stop(self.text, self.stops, start)
        if at is None:
            return False
        if self.include_stop:
            at += len(next(stop for stop in self.stops if self.text.startswith(stop, at)))
        self.text = self.text[:at]
        return True

    def release(self, finished: bool) -> str:
        """The next piece of text that is safe to show."""
        end = len(self.text) if finished else len(self.text) - holdback(self.text, self.stops)
        if end <= self.sent:
            return ""
        piece = self.text[self.sent : end]
        self.sent = end
        return piece
