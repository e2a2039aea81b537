"""``edgeinfer chat`` and ``edgeinfer run`` driven from the outside.

Most tests go through click's CliRunner (stdin is then not a terminal, so
chat reads one turn per line and prints only answers on stdout); a few run
the real console entry point in a subprocess where a real pipe matters.

The tiny model's output is noise, so instead of looking for words the
tests replay the same turns through the library (a fresh Engine and a
ChatSession, greedy sampling) and compare whole transcripts. Greedy output
on the same sequence of llama.cpp calls is deterministic, so any lost,
merged or extra turn, or a setting that did not take, changes the text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgeinfer
from edgeinfer.chat import ChatSession
from edgeinfer.cli import cli
from edgeinfer.cli.chat import Repl

SUBPROCESS_TIMEOUT = 300  # the machine is small and shared; a hang still ends
STATS_LINE = re.compile(r"time to first token \d+ ms, prefill [\d.]+ tok/s, decode [\d.]+ tok/s, "
                        r"prompt (\d+) tokens \((\d+) cached\), (\d+) generated, finish: (\w+)")


def invoke(args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def edgeinfer_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "edgeinfer", *[str(a) for a in args]]


def replay(model: Path, steps, **options) -> tuple[list[str], ChatSession]:
    """Run ``steps`` through the library the way the REPL does and return
    the answers. A step is a user turn (str) or a callable on the session."""
    answers = []
    with edgeinfer.load(model) as engine:
        session = ChatSession(engine, **options)
        for step in steps:
            if isinstance(step, str):
                answers.append(session.send(step))
            else:
                step(session)
    return answers, session


def transcript(answers: list[str]) -> str:
    return "".join(a + "\n" for a in answers)


def stderr_lines(result) -> list[str]:
    return result.stderr.splitlines()


# -- chat with stdin not a terminal -------------------------------------------

def test_each_line_is_a_turn_and_only_answers_reach_stdout(tiny_model):
    result = invoke(["chat", tiny_model, "--max-tokens", 5, "--temperature", 0], input="hello\nworld\n")

    answers, session = replay(tiny_model, ["hello", "world"], temperature=0, max_tokens=5)
    assert all(a.strip() for a in answers), "the reference answers must not be empty"
    assert result.exit_code == 0
    assert result.stdout == transcript(answers)
    assert ">>>" not in result.output and "Chatting with" not in result.output
    assert result.stderr == ""
    assert session.last_stats.generated_tokens <= 5


def test_the_same_input_gives_the_same_transcript_twice(tiny_model):
    args = ["chat", tiny_model, "--max-tokens", 8, "--temperature", 0]
    first = invoke(args, input="one\ntwo\nthree\n")
    second = invoke(args, input="one\ntwo\nthree\n")

    assert first.exit_code == second.exit_code == 0
    assert first.stdout == second.stdout
    assert first.stdout == transcript(replay(tiny_model, ["one", "two", "three"],
                                             temperature=0, max_tokens=8)[0])


def test_blank_lines_are_not_turns(tiny_model):
    result = invoke(["chat", tiny_model, "--max-tokens", 4, "--temperature", 0], input="\n  \nhello\n\n")

    assert result.exit_code == 0
    assert result.stdout == transcript(replay(tiny_model, ["hello"], temperature=0, max_tokens=4)[0])


def test_a_real_pipe_keeps_answers_on_stdout_and_messages_on_stderr(tiny_model, tmp_path):
    conv = tmp_path / "conv.json"
    lines = ["/stats", "hello", "/foo", "world", f"/save {conv}"]
    proc = subprocess.run(edgeinfer_cmd("chat", tiny_model, "--max-tokens", 6, "--temperature", 0),
                          input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)

    answers, _ = replay(tiny_model, ["hello", "world"], temperature=0, max_tokens=6)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == transcript(answers)
    assert proc.stderr.splitlines() == [
        "No answer yet - ask something first.",
        "Unknown command /foo - type /help for the list",
        f"Saved 4 messages to {conv}.",
    ]
    assert [m["content"] for m in json.loads(conv.read_text())["messages"]] == \
        ["hello", answers[0], "world", answers[1]]


# -- slash commands -------------------------------------------------------------

def test_a_bad_set_value_is_a_one_line_hint_and_changes_nothing(tiny_model):
    result = invoke(["chat", tiny_model, "--max-tokens", 6, "--temperature", 0],
                    input="/set temperature abc\n/set top_k 1.5\nhello\n")

    assert result.exit_code == 0
    assert stderr_lines(result) == [
        "'abc' is not a valid temperature - try e.g. /set temperature 0.7",
        "'1.5' is not a valid top_k - try e.g. /set top_k 40",
    ]
    # still greedy, still 6 tokens: the bad values were not applied
    assert result.stdout == transcript(replay(tiny_model, ["hello"], temperature=0, max_tokens=6)[0])


def test_set_without_a_value_or_with_an_unknown_name_shows_usage(tiny_model):
    result = invoke(["chat", tiny_model, "--max-tokens", 3], input="/set\n/set temperature\n/set colour 3\n")

    usage = ("Usage: /set NAME VALUE, NAME one of temperature, top_k, top_p, min_p, repeat_penalty, "
             "repeat_last_n, frequency_penalty, presence_penalty, dry_multiplier, dry_base, "
             "dry_allowed_length, dry_last_n, infill, max_tokens, seed, tool_choice, parallel_tool_calls")
    assert result.exit_code == 0
    assert stderr_lines(result) == [usage] * 3
    assert result.stdout == ""


def test_set_max_tokens_applies_to_the_next_answers(tiny_model):
    result = invoke(["chat", tiny_model, "--max-tokens", 20, "--temperature", 0],
                    input="/set max_tokens 3\nhello\n/stats\n")

    answers, session = replay(tiny_model, ["hello"], temperature=0, max_tokens=3)
    ref = session.last_stats
    assert result.exit_code == 0
    assert result.stdout == transcript(answers)
    err = stderr_lines(result)
    assert err[0] == "max_tokens = 3"
    m = STATS_LINE.fullmatch(err[1])
    assert m, err
    assert (int(m[1]), int(m[2]), int(m[3]), m[4]) == \
        (ref.prompt_tokens, ref.cached_tokens, ref.generated_tokens, ref.finish_reason)
    assert int(m[3]) <= 3
    assert len(err) == 2


def test_set_seed_and_temperature_make_sampling_reproducible(tiny_model):
    script = "/set temperature 1.5\n/set seed 7\nhello\n"
    first = invoke(["chat", tiny_model, "--max-tokens", 12], input=script)
    second = invoke(["chat", tiny_model, "--max-tokens", 12], input=script)
    greedy = replay(tiny_model, ["hello"], temperature=0, max_tokens=12)[0]
    sampled = replay(tiny_model, ["hello"], temperature=1.5, seed=7, max_tokens=12)[0]

    assert first.exit_code == second.exit_code == 0
    assert first.stderr.splitlines() == ["temperature = 1.5", "seed = 7"]
    assert first.stdout == second.stdout == transcript(sampled)
    assert sampled != greedy  # otherwise this test could not tell the settings took


def test_unknown_command_is_a_hint_and_the_chat_goes_on(tiny_model):
    result = invoke(["chat", tiny_model, "--max-tokens", 4, "--temperature", 0], input="/foo\nhello\n")

    assert result.exit_code == 0
    assert stderr_lines(result) == ["Unknown command /foo - type /help for the list"]
    assert result.stdout == transcript(replay(tiny_model, ["hello"], temperature=0, max_tokens=4)[0])


def test_stats_before_any_answer_says_so(tiny_model):
    result = invoke(["chat", tiny_model], input="/stats\n")

    assert result.exit_code == 0
    assert stderr_lines(result) == ["No answer yet - ask something first."]
    assert result.stdout == ""


def test_help_lists_every_command_on_stderr(tiny_model):
    result = invoke(["chat", tiny_model], input="/help\n")

    assert result.exit_code == 0
    assert result.stdout == ""
    for cmd in ("/help", "/reset", "/system", "/set", "/stats", "/save", "/load", "/exit", '"""'):
        assert cmd in result.stderr


def test_save_then_load_round_trips_the_conversation(tiny_model, tmp_path):
    conv, after = tmp_path / "conv.json", tmp_path / "after.json"
    lines = ["hello", f"/save {conv}", "/reset", "other", f"/load {conv}", "more", f"/save {after}"]
    result = invoke(["chat", tiny_model, "--max-tokens", 5, "--temperature", 0], input="\n".join(lines) + "\n")

    answers, _ = replay(tiny_model, ["hello", lambda s: s.save(tmp_path / "ref.json"), lambda s: s.reset(),
                                     "other", lambda s: s.load(tmp_path / "ref.json"), "more"],
                        temperature=0, max_tokens=5)
    assert result.exit_code == 0
    assert result.stdout == transcript(answers)
    assert stderr_lines(result) == [f"Saved 2 messages to {conv}.", "Conversation cleared.",
                                    f"Loaded 2 messages from {conv}.", f"Saved 4 messages to {after}."]
    saved = json.loads(conv.read_text(encoding="utf-8"))
    assert saved == {"system": None, "messages": [{"role": "user", "content": "hello"},
                                                  {"role": "assistant", "content": answers[0]}]}
    # the loaded turns, not the ones after /reset, are what "more" continued
    assert [m["content"] for m in json.loads(after.read_text(encoding="utf-8"))["messages"]] == \
        ["hello", answers[0], "more", answers[2]]


def test_load_of_a_bad_file_is_a_one_line_error_and_keeps_the_conversation(tiny_model, tmp_path):
    bad, after = tmp_path / "bad.json", tmp_path / "after.json"
    bad.write_text("{not json", encoding="utf-8")
    lines = ["hello", f"/load {bad}", f"/load {tmp_path / 'missing.json'}", f"/save {after}"]
    result = invoke(["chat", tiny_model, "--max-tokens", 3, "--temperature", 0], input="\n".join(lines) + "\n")

    answers, _ = replay(tiny_model, ["hello"], temperature=0, max_tokens=3)
    assert result.exit_code == 0
    err = stderr_lines(result)
    assert len(err) == 3
    assert err[0].startswith(f"Error: cannot load a conversation from {bad}")
    assert err[1].startswith(f"Error: cannot load a conversation from {tmp_path / 'missing.json'}")
    assert all(e.endswith("pass a file written by /save or ChatSession.save()") for e in err[:2])
    assert [m["content"] for m in json.loads(after.read_text(encoding="utf-8"))["messages"]] == \
        ["hello", answers[0]]


def test_save_to_an_unwritable_path_is_a_hint(tiny_model, tmp_path):
    target = tmp_path / "no-such-dir" / "conv.json"
    result = invoke(["chat", tiny_model, "--max-tokens", 3], input=f"/save {target}\n/save\n/load\n")

    assert result.exit_code == 0
    err = stderr_lines(result)
    assert err[0].startswith(f"Cannot save to {target}: ") and err[0].endswith(" - pick another path")
    assert err[1:] == ["Usage: /save FILE", "Usage: /load FILE"]
    assert not target.parent.exists()


def test_reset_forgets_the_turns(tiny_model, tmp_path):
    conv = tmp_path / "conv.json"
    lines = ["hello", "/reset", f"/save {conv}", "hello"]
    result = invoke(["chat", tiny_model, "--max-tokens", 5, "--temperature", 0, "--system", "Be terse."],
                    input="\n".join(lines) + "\n")

    answers, _ = replay(tiny_model, ["hello", lambda s: s.reset(), "hello"],
                        system="Be terse.", temperature=0, max_tokens=5)
    assert result.exit_code == 0
    assert stderr_lines(result) == ["Conversation cleared.", f"Saved 0 messages to {conv}."]
    # the system prompt outlives /reset
    assert json.loads(conv.read_text(encoding="utf-8")) == {"system": "Be terse.", "messages": []}
    assert result.stdout == transcript(answers)


def test_system_sets_the_prompt_and_starts_over(tiny_model, tmp_path):
    conv = tmp_path / "conv.json"
    lines = ["/system", "hello", "/system You are a pirate.", "/system", "hello", f"/save {conv}"]
    result = invoke(["chat", tiny_model, "--max-tokens", 5, "--temperature", 0], input="\n".join(lines) + "\n")

    def set_system(s):
        s.system = "You are a pirate."
        s.reset()

    answers, _ = replay(tiny_model, ["hello", set_system, "hello"], temperature=0, max_tokens=5)
    plain = replay(tiny_model, ["hello"], temperature=0, max_tokens=5)[0][0]
    assert result.exit_code == 0
    assert stderr_lines(result) == [
        "System prompt: (none)  - set it with /system TEXT",
        "System prompt set; conversation cleared.",
        "System prompt: You are a pirate.  - set it with /system TEXT",
        f"Saved 2 messages to {conv}.",
    ]
    assert result.stdout == transcript(answers)
    assert answers[1] != plain  # the system prompt reached the model
    saved = json.loads(conv.read_text(encoding="utf-8"))
    assert saved["system"] == "You are a pirate."
    assert [m["content"] for m in saved["messages"]] == ["hello", answers[1]]


def test_exit_ends_the_chat_and_ignores_the_rest(tiny_model):
    for word in ("/exit", "/bye", "/quit"):
        result = invoke(["chat", tiny_model, "--max-tokens", 4, "--temperature", 0],
                        input=f"hello\n{word}\nnever asked\n")

        assert result.exit_code == 0
        assert result.stdout == transcript(replay(tiny_model, ["hello"], temperature=0, max_tokens=4)[0])
        assert result.stderr == ""


# -- multi-line blocks ------------------------------------------------------------

def test_a_triple_quoted_block_is_one_turn(tiny_model, tmp_path):
    conv = tmp_path / "conv.json"
    lines = ['"""', "line one", "", "line two", '"""', '"""inline"""', '"""first', 'second"""', f"/save {conv}"]
    result = invoke(["chat", tiny_model, "--max-tokens", 4, "--temperature", 0], input="\n".join(lines) + "\n")

    turns = ["line one\n\nline two", "inline", "first\nsecond"]
    answers, _ = replay(tiny_model, turns, temperature=0, max_tokens=4)
    assert result.exit_code == 0
    assert result.stdout == transcript(answers)
    saved = json.loads(conv.read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in saved if m["role"] == "user"] == turns


def test_a_block_that_starts_with_a_slash_is_text_not_a_command(tiny_model, tmp_path):
    conv = tmp_path / "conv.json"
    lines = ['"""', "// what does this do?", "int x = 1;", '"""', f"/save {conv}"]
    result = invoke(["chat", tiny_model, "--max-tokens", 3, "--temperature", 0], input="\n".join(lines) + "\n")

    turn = "// what does this do?\nint x = 1;"
    assert result.exit_code == 0
    assert result.stdout == transcript(replay(tiny_model, [turn], temperature=0, max_tokens=3)[0])
    assert [m["content"] for m in json.loads(conv.read_text(encoding="utf-8"))["messages"]][0] == turn


def test_an_unclosed_block_at_end_of_input_is_still_a_turn(tiny_model):
    result = invoke(["chat", tiny_model, "--max-tokens", 3, "--temperature", 0],
                    input='"""\nline one\nline two\n')

    assert result.exit_code == 0
    assert result.stdout == transcript(replay(tiny_model, ["line one\nline two"], temperature=0, max_tokens=3)[0])


# -- Ctrl-C ------------------------------------------------------------------------------

class InterruptOnWrite(io.StringIO):
    """A terminal where Ctrl-C lands while the ``at``-th write is printed."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.writes, self.shown = at, 0, None

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes == self.at:
            self.shown = self.getvalue()
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_while_a_piece_is_printed_still_stops_the_generation(tiny_model):
    out = InterruptOnWrite(at=20)
    turns = iter(["Tell me a long story"])

    def read(_prompt):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    engine = edgeinfer.load(tiny_model, n_ctx=8192, lock_timeout=5)
    try:
        session = ChatSession(engine, temperature=0, max_tokens=100000)
        assert Repl(session, read, out, interactive=True).run() == 0
        assert "(stopped)" in out.getvalue()
        shown = out.shown.split("\n", 1)[1]  # after the banner
        assert shown

        session.send("and then?", max_tokens=3)  # EngineBusyError after 5 s if it still runs

        assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
        assert session.history[1]["content"].startswith(shown)
        assert len(session.history[1]["content"]) < len(shown) + 2000
    finally:
        engine.close()


class SigintOnWrite(io.StringIO):
    """A terminal where the person presses Ctrl-C (a real SIGINT to this
    process) while the ``at``-th piece of an answer is printed."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.writes = at, 0

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes == self.at:
            signal.raise_signal(signal.SIGINT)
        return super().write(text)


def test_ctrl_c_during_an_answer_ends_it_as_cancelled_and_the_chat_goes_on(tiny_model):
    out = SigintOnWrite(at=20)
    turns = iter(["Tell me a long story", "/stats", "/set max_tokens 5", "and then?"])

    def read(_prompt):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    handler = signal.getsignal(signal.SIGINT)
    with edgeinfer.load(tiny_model, n_ctx=8192, lock_timeout=5) as engine:
        # past end of turn: the first answer would run to the end of the context
        session = ChatSession(engine, temperature=0, max_tokens=100000, ignore_eos=True)
        assert Repl(session, read, out, interactive=True).run() == 0

    shown = out.getvalue()
    assert "(stopped)" in shown
    assert re.search(r"finish: cancelled$", shown, re.M), shown[-300:]
    assert signal.getsignal(signal.SIGINT) is handler          # Ctrl-C raises again between answers
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    first = session.history[1]["content"]
    assert first and first in shown                           # kept as far as it was shown
    assert (session.last_stats.generated_tokens, session.last_stats.finish_reason) == (5, "length")


def test_ctrl_c_stops_a_piped_answer_that_waits_for_its_reader(tiny_model):
    """A real SIGINT, and an answer that cannot end before it: the pipe
    holds 4 KiB, the answer about 17 KiB, and the engine generates at most
    256 tokens ahead of what the chat has written."""
    fcntl = pytest.importorskip("fcntl")
    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        pytest.skip("needs a pipe whose size can be set (Linux)")
    proc = subprocess.Popen(edgeinfer_cmd("chat", tiny_model, "--ignore-eos", "--max-tokens", 100000,
                                          "--n-ctx", 8192, "--temperature", 0, "--speculative", "off"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        proc.stdin.write(b"Tell me a long story\n/stats\n/set max_tokens 5\nand then?\n/stats\n")
        proc.stdin.close()
        os.read(proc.stdout.fileno(), 1)     # the answer has begun, so Ctrl-C is the chat's to handle
        proc.send_signal(signal.SIGINT)
        proc.stdout.read()                   # the rest of the answers (stderr holds a few lines)
        err = proc.stderr.read()
        proc.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        proc.kill()

    assert proc.returncode == 0, err
    notes = err.decode().splitlines()
    assert notes[0] == "(stopped)" and notes[2] == "max_tokens = 5", notes
    stopped, then = STATS_LINE.fullmatch(notes[1]), STATS_LINE.fullmatch(notes[3])
    assert stopped[4] == "cancelled" and 0 < int(stopped[3]) < 8192 - int(stopped[1])
    assert (then[3], then[4]) == ("5", "length") and int(then[2]) > 0   # on the stopped turn's KV state


# -- run ------------------------------------------------------------------------------

STATS_KEYS = {"prompt_tokens", "cached_tokens", "generated_tokens", "ttft_s", "prefill_tps",
              "decode_tps", "finish_reason"}


def reference_run(model: Path, prompt: str, **options) -> str:
    with edgeinfer.load(model) as engine:
        return engine.chat([{"role": "user", "content": prompt}], **options)


def test_run_json_gives_the_text_and_its_stats(tiny_model):
    result = invoke(["run", tiny_model, "Tell me a story", "--json", "--max-tokens", 6, "--temperature", 0])

    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["model"] == tiny_model.name
    assert data["text"] == reference_run(tiny_model, "Tell me a story", max_tokens=6, temperature=0)
    stats = data["stats"]
    assert STATS_KEYS <= set(stats)
    assert stats["finish_reason"] in ("length", "stop")
    assert 1 <= stats["generated_tokens"] <= 6
    assert stats["prompt_tokens"] > 3 and stats["cached_tokens"] == 0
    assert stats["ttft_s"] > 0 and stats["prefill_tps"] > 0
    assert result.stderr == ""


def test_run_prints_the_answer_and_a_newline(tiny_model):
    result = invoke(["run", tiny_model, "hello", "--max-tokens", 5, "--temperature", 0])

    assert result.exit_code == 0
    assert result.stdout == reference_run(tiny_model, "hello", max_tokens=5, temperature=0) + "\n"


def test_run_system_option_reaches_the_model(tiny_model):
    result = invoke(["run", tiny_model, "hello", "--system", "You are a pirate.", "--max-tokens", 5,
                     "--temperature", 0, "--json"])

    with edgeinfer.load(tiny_model) as engine:
        expected = engine.chat([{"role": "system", "content": "You are a pirate."},
                                {"role": "user", "content": "hello"}], max_tokens=5, temperature=0)
    assert json.loads(result.stdout)["text"] == expected
    assert expected != reference_run(tiny_model, "hello", max_tokens=5, temperature=0)


def test_run_dash_reads_the_prompt_from_a_pipe(tiny_model):
    prompt = "Summarize this:\nline one\nline two\n"
    proc = subprocess.run(edgeinfer_cmd("run", tiny_model, "-", "--max-tokens", 5, "--temperature", 0),
                          input=prompt, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference_run(tiny_model, prompt, max_tokens=5, temperature=0) + "\n"
    assert proc.stdout != reference_run(tiny_model, "-", max_tokens=5, temperature=0) + "\n"


def test_run_greedy_is_the_same_across_processes(tiny_model):
    cmd = edgeinfer_cmd("run", tiny_model, "Why is the sky blue?", "--max-tokens", 4, "--temperature", 0)
    first, second = (subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
                     for _ in range(2))

    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout
    assert first.stdout.strip()


def test_run_ignore_eos_runs_past_the_end_of_turn_to_max_tokens(tiny_model):
    args = ["run", tiny_model, "Tell me a long story", "--json", "--max-tokens", 300, "--temperature", 0]
    plain = json.loads(invoke(args).stdout)["stats"]
    past = json.loads(invoke(args + ["--ignore-eos"]).stdout)["stats"]

    assert plain["generated_tokens"] < 300      # greedy falls into a loop, which ends the answer
    assert (past["generated_tokens"], past["finish_reason"]) == (300, "length")


def test_ctrl_c_stops_run_with_exit_status_130(tiny_model):
    """As the piped chat above: the answer waits for its reader, so the
    SIGINT is certain to land while it runs."""
    fcntl = pytest.importorskip("fcntl")
    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        pytest.skip("needs a pipe whose size can be set (Linux)")
    proc = subprocess.Popen(edgeinfer_cmd("run", tiny_model, "Tell me a long story", "--ignore-eos",
                                          "--max-tokens", 100000, "--n-ctx", 8192, "--temperature", 0,
                                          "--speculative", "off"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        os.read(proc.stdout.fileno(), 1)
        proc.send_signal(signal.SIGINT)
        out = proc.stdout.read()
        err = proc.stderr.read()
        proc.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        proc.kill()

    assert proc.returncode == 130, err
    assert out.endswith(b"\n")                  # the part of the answer shown, then a newline
    assert err == b""


# -- missing models ----------------------------------------------------------------

def assert_one_line_error(result, *needles):
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_chat_with_an_unknown_model_is_a_one_line_error_with_a_hint(edgeinfer_home):
    result = invoke(["chat", "not-a-model"], input="hello\n")

    # not in the catalog either: a pull by that name cannot work, so the hint is the catalog
    assert_one_line_error(result, "'not-a-model'", "not in the store or the catalog", "edgeinfer list --catalog")
    assert not (edgeinfer_home / "blobs").exists()


def test_run_with_an_unknown_model_is_a_one_line_error_with_a_hint():
    result = invoke(["run", "not-a-model", "hello"])

    assert_one_line_error(result, "'not-a-model'", "edgeinfer list --catalog")
    assert "edgeinfer pull not-a-model" not in result.stderr


def test_run_with_a_missing_file_says_so(tmp_path):
    result = invoke(["run", tmp_path / "missing.gguf", "hello"])

    assert_one_line_error(result, "no such file", "check the path")


def test_chat_with_a_missing_file_says_so(tmp_path):
    result = invoke(["chat", tmp_path / "missing.gguf"], input="hello\n")

    assert_one_line_error(result, "no such file", "check the path")


def without_choice_line(result, ref: str):
    """The result with its first stderr line, which names the default
    model chosen for this machine, checked and taken off."""
    first, _, rest = result.stderr.partition("\n")
    assert first.startswith(f"Default model for this machine: {ref} ("), result.stderr
    result.stderr_bytes = rest.encode()
    return result


def test_chat_without_a_terminal_does_not_pull_the_default_without_yes(edgeinfer_home):
    from edgeinfer import model_choice

    ref = model_choice.choose().entry.ref
    result = without_choice_line(invoke(["chat"], input="hello\n"), ref)

    assert_one_line_error(result, ref, "is not in the store", f"edgeinfer pull {ref}", "--yes")
    assert not (edgeinfer_home / "blobs").exists()


def write_user_entry(config: Path, model: Path, name: str, tag: str, *, default_model: bool = False,
                     sha256: str | None = None, size: int | None = None, system: str = "") -> None:
    """A catalog entry in $EDGEINFER_CONFIG/models whose only source is a local file."""
    data = model.read_bytes() if sha256 is None else b""
    (config / "models").mkdir(parents=True, exist_ok=True)
    (config / "models" / f"{name}-{tag}.toml").write_text(
        f'name = "{name}"\ntag = "{tag}"\ndefault_tag = true\n'
        f"default_model = {'true' if default_model else 'false'}\n"
        f'file = "{model.name}"\nsize = {size or len(data)}\n'
        f'sha256 = "{sha256 or hashlib.sha256(data).hexdigest()}"\nlicense = "MIT"\n'
        f"system = {json.dumps(system)}\n\n"
        f'[[sources]]\nkind = "file"\npath = "{model}"\n', encoding="utf-8")


def test_chat_yes_pulls_a_missing_catalog_model_then_answers(tiny_model, edgeinfer_home):
    write_user_entry(Path(os.environ["EDGEINFER_CONFIG"]), tiny_model, "tiny", "f32")

    refused = invoke(["chat", "tiny"], input="hello\n")
    assert_one_line_error(refused, "'tiny'", "edgeinfer pull tiny", "--yes")
    assert not (edgeinfer_home / "blobs").exists()

    result = invoke(["chat", "tiny", "--yes", "--max-tokens", 5, "--temperature", 0], input="hello\n")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == transcript(replay(tiny_model, ["hello"], temperature=0, max_tokens=5)[0])
    assert "pulled tiny:f32" in result.stderr
    blob = edgeinfer_home / "blobs" / f"sha256-{hashlib.sha256(tiny_model.read_bytes()).hexdigest()}"
    assert blob.read_bytes() == tiny_model.read_bytes()
    # now in the store: no --yes needed, nothing pulled again
    again = invoke(["chat", "tiny", "--max-tokens", 5, "--temperature", 0], input="hello\n")
    assert again.exit_code == 0 and again.stdout == result.stdout and again.stderr == ""


def test_a_user_catalog_default_is_the_model_chat_starts(tiny_model, edgeinfer_home):
    write_user_entry(Path(os.environ["EDGEINFER_CONFIG"]), tiny_model, "mydefault", "f32", default_model=True)

    # no --yes: the hint names the model chat would pull, and nothing is fetched
    result = without_choice_line(invoke(["chat"], input="hello\n"), "mydefault:f32")

    assert_one_line_error(result, "edgeinfer pull mydefault:f32")


# -- the real default model ---------------------------------------------------------

@pytest.mark.real_model
def test_run_real_model_knows_the_capital_of_france(real_model_home):
    result = invoke(["run", "smollm2-135m-instruct", "What is the capital of France?",
                     "--temperature", 0, "--max-tokens", 48])

    assert result.exit_code == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.real_model
def test_chat_real_model_answers_two_questions_in_turn(real_model_home, tmp_path):
    conv = tmp_path / "conv.json"
    lines = ["What is the capital of France?", "What is the capital of Germany?", f"/save {conv}"]
    proc = subprocess.run(edgeinfer_cmd("chat", "smollm2-135m-instruct", "--temperature", 0, "--max-tokens", 48),
                          input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)

    assert proc.returncode == 0, proc.stderr
    answers = [m["content"] for m in json.loads(conv.read_text(encoding="utf-8"))["messages"]
               if m["role"] == "assistant"]
    assert len(answers) == 2
    assert "Paris" in answers[0]
    assert "Berlin" in answers[1]
    assert proc.stdout == transcript(answers)


@pytest.mark.real_model
def test_chat_yes_pulls_the_default_model_and_answers(real_store, edgeinfer_home, tmp_path, monkeypatch):
    """An empty store whose catalog default has a local file source: the
    user's entry overrides the shipped one under the same name (same size,
    sha256 and system prompt, the real blob as its only source), so no
    network is needed and the pull still goes through the model manager.
    The default is pinned to SmolLM2, which this test means."""
    from edgeinfer import catalog

    monkeypatch.setenv("EDGEINFER_MODEL", "smollm2-135m-instruct")
    shipped = catalog.default_entry()
    blob = real_store.blob_path(shipped.sha256)
    write_user_entry(Path(os.environ["EDGEINFER_CONFIG"]), blob, shipped.name, shipped.tag,
                     default_model=True, sha256=shipped.sha256, size=shipped.size, system=shipped.system)
    assert not (edgeinfer_home / "manifests").exists()

    proc = subprocess.run(edgeinfer_cmd("chat", "--yes", "--temperature", 0, "--max-tokens", 48),
                          input="What is the capital of France?\n", capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)

    assert proc.returncode == 0, proc.stderr
    assert f"pulled {shipped.ref}" in proc.stderr
    assert "Paris" in proc.stdout
    assert (edgeinfer_home / "blobs" / f"sha256-{shipped.sha256}").stat().st_size == shipped.size


def test_run_raw_continues_the_prompt_without_the_chat_template(tiny_model):
    result = invoke(["run", tiny_model, "Tell me a story", "--raw", "--json", "--max-tokens", 6,
                     "--temperature", 0])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    with edgeinfer.load(tiny_model, prompt_cache=False) as engine:
        expected = engine.generate("Tell me a story", max_tokens=6, temperature=0)
        assert data["stats"]["prompt_tokens"] == len(engine.tokenize("Tell me a story"))
    assert data["text"] == expected


def test_reset_keeps_the_system_prompt_prefix_warm(tiny_model):
    system = "You answer questions about small computers. " * 8
    lines = ["first question about cores", "second question", "/reset", "a new question", "/stats"]
    result = invoke(["chat", tiny_model, "--max-tokens", 4, "--temperature", 0, "--system", system],
                    input="\n".join(lines) + "\n")

    assert result.exit_code == 0, result.stderr
    stats = [line for line in stderr_lines(result) if line.startswith("time to first token")]
    cached = int(re.search(r"\((\d+) cached\)", stats[-1]).group(1))
    prompt = int(re.search(r"prompt (\d+) tokens", stats[-1]).group(1))
    with edgeinfer.load(tiny_model, prompt_cache=False) as engine:
        system_part = len(engine.chat_tokens([{"role": "system", "content": system}], add_generation_prompt=False))
    # after /reset the new prompt reuses at least the system prompt's tokens
    assert system_part - 2 <= cached < prompt


# -- tools ------------------------------------------------------------------------------
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}]


def test_a_tool_call_is_shown_and_its_result_answered(tiny_model, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(WEATHER))
    script = (f"/tools {tools}\n/set temperature 0\n/set max_tokens 200\n/set tool_choice required\n"
              "/set parallel_tool_calls off\n"
              "Weather in Paris?\n/set tool_choice none\n/set max_tokens 6\n/result 21 C\n/tools\n/result x\n")
    r = invoke(["chat", tiny_model], input=script)
    assert r.exit_code == 0, r.output
    out = r.output
    call = re.search(r"\[call get_weather\((.*?)\)\]", out, re.S)
    assert call and isinstance(json.loads(call.group(1))["city"], str), out
    assert "(answer the call with /result TEXT)" in out and "No tool call is waiting for a result." in out
    assert "Offering 1 tool(s): get_weather" in out and "Tools: get_weather" in out
    # The same turns through the library: the call, then the answer to its result.
    def answer_result(session):
        session.tool_result(session.last_calls[0].id, "21 C")
        answers.append(session.send(None, tool_choice="none", max_tokens=6))

    answers: list[str] = []
    replayed, session = replay(tiny_model, ["Weather in Paris?", answer_result], tools=WEATHER, temperature=0,
                               max_tokens=200, tool_choice="required", parallel_tool_calls=False)
    assert session.history[1]["tool_calls"][0]["function"]["arguments"] == json.loads(call.group(1))
    assert session.history[2]["role"] == "tool" and answers[0] in out


def test_a_conversation_with_calls_saves_and_loads(tiny_model, tmp_path):
    with edgeinfer.load(tiny_model) as engine:
        session = ChatSession(engine, tools=WEATHER, temperature=0, max_tokens=200, parallel_tool_calls=False)
        session.send("Weather in Paris?", tool_choice="required")
        (call,) = session.last_calls
        session.tool_result(call.id, "21 C")
        session.save(tmp_path / "talk.json")
        again = ChatSession(engine, tools=WEATHER)
        again.load(tmp_path / "talk.json")
        assert again.history == session.history
        assert again.history[1]["tool_calls"][0]["id"] == call.id
