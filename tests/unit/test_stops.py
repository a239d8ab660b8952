"""Stop strings: cut at the earliest one, and never show the start of one in a stream."""

from hypothesis import given
from hypothesis import strategies as st

from modelfleet.worker.stops import TextState, find_stop, holdback


class CharDecoder:
    """Each token is one character; enough to drive TextState like a real tokenizer would."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids)


def test_find_stop_takes_the_earliest():
    assert find_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert find_stop("nothing here", ["STOP"]) is None


def test_holdback_keeps_a_possible_prefix():
    assert holdback("hello ST", ["STOP"]) == 2
    assert holdback("hello", ["STOP"]) == 0
    assert holdback("aaa", ["aab"]) == 2


def stream(text: str, stops: list[str]) -> tuple[list[str], str, bool]:
    alphabet = "".join(sorted(set(text))) or "a"
    dec = CharDecoder(alphabet)
    state = TextState(stops=stops)
    pieces, stopped = [], False
    for ch in text:
        before = len(state.text)
        state.add_token(dec, alphabet.index(ch))
        stopped = state.check_stop(len(state.text) - before)
        pieces.append(state.release(finished=stopped))
        if stopped:
            break
    if not stopped:
        pieces.append(state.release(finished=True))
    return pieces, state.text, stopped


def test_stop_string_spanning_tokens_is_cut_and_never_shown():
    pieces, text, stopped = stream("one two###three", ["###"])
    assert stopped
    assert text == "one two"
    assert "".join(pieces) == "one two"
    assert not any("#" in p for p in pieces)


@given(st.text(alphabet="ab#", max_size=40), st.lists(st.text(alphabet="ab#", min_size=1, max_size=4),
                                                      min_size=1, max_size=3))
def test_streamed_text_equals_final_text_and_never_contains_a_stop(text, stops):
    pieces, final, stopped = stream(text, stops)
    shown = "".join(pieces)
    assert shown == final
    assert not any(s in shown for s in stops)
    # Generation stops as soon as any stop string completes, and cuts at the earliest one then seen.
    expected = text
    for end in range(1, len(text) + 1):
        found = [text[:end].find(s) for s in stops if s in text[:end]]
        if found:
            expected = text[: min(found)]
            break
    assert final == expected
    assert stopped == (expected != text or any(s in text for s in stops))
