"""A sequence's text rules, token by token, without a model: UTF-8 pieces,
stop strings, max_tokens, a full context, loops, the tail at the end."""

from __future__ import annotations

import pytest

from edgeinfer.sequence import Request, Sequence, State


def seq(max_tokens: int = 10, stops=(), ignore_eos: bool = False, prompt=(1, 2, 3), cached: int = 0) -> Sequence:
    req = Request(list(prompt), max_tokens, list(stops), seed=0, options={}, sink=lambda item: None,
                  ignore_eos=ignore_eos)
    return Sequence(req, 0, cached)


def feed(s: Sequence, pieces: list[bytes], **kw) -> tuple[str, str | None]:
    """Emit one token per piece (ids 100, 101, ...); the text delivered
    and the finish reason, if one came."""
    text, reason = "", None
    for i, piece in enumerate(pieces):
        event, reason = s.emit(100 + i, piece, **kw)
        text += event.text if event else ""
        if reason:
            break
    return text, reason


def test_a_sequence_moves_from_prefilling_to_decoding_to_finished():
    s = seq(prompt=range(10), cached=4)
    assert s.state is State.PREFILLING and s.pending == [4, 5, 6, 7, 8, 9]
    assert not s.prefill_done(4)
    assert s.state is State.PREFILLING and s.pending == [8, 9]
    assert s.prefill_done(2)
    assert s.state is State.DECODING
    s.finish("stop", now=s.t0 + 1)
    assert s.state is State.FINISHED and s.stats.finish_reason == "stop"


def test_utf8_is_held_until_the_character_is_whole_and_every_id_is_reported_once():
    s = seq()
    snow = "☃".encode()
    pieces = [b"a", snow[:1], snow[1:2], snow[2:], b"b"]
    events = [s.emit(100 + i, p)[0] for i, p in enumerate(pieces)]
    assert [e and e.text for e in events] == ["a", None, None, "☃", "b"]
    assert [e.tokens for e in events if e] == [[100], [101, 102, 103], [104]]


def test_a_stop_string_ends_the_answer_and_is_not_part_of_it():
    s = seq(stops=["END"])
    text, reason = feed(s, [b"one ", b"E", b"N", b"D", b" more"])
    assert (text, reason) == ("one ", "stop_string")
    tail = s.finish(reason, now=s.t0)
    assert tail is not None and tail.text == "" and tail.tokens == [101, 102, 103]
    assert s.stats.finish_reason == "stop" and s.stats.stop_sequence == "END"


def test_held_back_text_that_never_became_a_stop_string_belongs_to_the_answer():
    s = seq(max_tokens=2, stops=["END"])
    text, reason = feed(s, [b"one ", b"EN"])
    assert (text, reason) == ("one ", "length")
    tail = s.finish(reason, now=s.t0)
    assert tail.text == "EN" and tail.tokens == [101]


def test_an_unfinished_character_at_the_end_becomes_a_replacement_character():
    s = seq(max_tokens=1)
    assert feed(s, ["☃".encode()[:2]]) == ("", "length")
    assert s.finish("length", now=s.t0).text == "\ufffd"


@pytest.mark.parametrize("n", [1, 5])
def test_max_tokens_ends_with_length(n):
    s = seq(max_tokens=n)
    text, reason = feed(s, [b"x"] * 10)
    assert reason == "length" and s.stats.generated_tokens == n and text == "x" * n


def test_a_full_context_ends_with_length():
    s = seq(max_tokens=100)
    assert s.emit(5, b"x", context_full=True)[1] == "length"


def test_a_loop_ends_with_repetition_unless_eos_is_ignored():
    looping = [b" a", b" b", b" c", b" d"] * 20
    assert feed(seq(max_tokens=80), looping)[1] == "length"   # the text repeats, the ids never do
    s = seq(max_tokens=80)
    for i, p in enumerate(looping):   # the same id per piece, as a real loop
        event, reason = s.emit(100 + i % 4, p)
        if reason:
            break
    assert reason == "repetition" and s.stats.generated_tokens < 80
    s = seq(max_tokens=80, ignore_eos=True)
    for i, p in enumerate(looping):
        event, reason = s.emit(100 + i % 4, p)
        if reason:
            break
    assert reason == "length" and s.stats.generated_tokens == 80


def test_the_next_step_evaluates_the_token_just_made():
    s = seq()
    s.prefill_done(len(s.pending))
    s.emit(42, b"x")
    assert s.pending == [42]
