"""``edgeinfer chat`` in a real terminal, driven through tmux.

The REPL's terminal behaviour (the ``>>> `` prompt, readline, Ctrl-C to
stop an answer, Ctrl-C or Ctrl-D to leave) only exists with a tty on
stdin, which CliRunner and pipes cannot give. Each test starts the real
command in its own tmux server (``-L``, a private socket, so nothing
touches the user's tmux), types into it with ``send-keys`` and reads the
screen with ``capture-pane``, polling with a bounded timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import edgeinfer

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed: these tests need it to give "
                                                      "edgeinfer chat a real terminal")

# Generous: the machine has 2 cores and other tests run beside these.
TIMEOUT = 90.0
PROMPT = ">>>"
STATS = re.compile(r"time to first token \d+ ms, prefill [\d.]+ tok/s, decode [\d.]+ tok/s, "
                   r"prompt (\d+) tokens \((\d+) cached\), (\d+) generated, finish: (\w+)")


class Terminal:
    """One command running in a 120x40 tmux pane of a private tmux server."""

    def __init__(self, args: list[str]):
        self.socket = f"edgeinfer-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.session = "chat"
        # The tmux server need not share this process's environment, so the
        # store and config dirs are passed on the command line.
        env = {k: os.environ[k] for k in ("EDGEINFER_HOME", "EDGEINFER_CONFIG")}
        command = (f"env -u EDGEINFER_DEBUG {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} "
                   f"{shlex.join(args)}; echo EXIT=$?; sleep 5")
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", self.session, "-x", "120", "-y", "40", command)
        self._tmux("set-option", "-t", self.session, "history-limit", "50000")

    def _tmux(self, *args: str) -> str:
        proc = subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args[:2])} failed: {proc.stderr.strip()}")
        return proc.stdout

    def screen(self) -> str:
        """The whole pane, scrollback included, wrapped lines joined."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.session).rstrip("\n")

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen().splitlines() if line.strip()]

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.session, *keys)

    def type(self, text: str) -> None:
        """Type ``text`` literally (no key-name lookup), then Enter."""
        self._tmux("send-keys", "-t", self.session, "-l", text)
        self.send("Enter")

    def wait_for(self, what: str, check, timeout: float = TIMEOUT):
        """Poll the screen until ``check(screen)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            found = check(screen)
            if found:
                return found
            if time.monotonic() > deadline:
                tail = "\n".join(screen.splitlines()[-15:])
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; the screen ends:\n{tail}")
            time.sleep(0.1)

    def wait_for_prompt(self, after: int = 0, timeout: float = TIMEOUT) -> list[str]:
        """Wait until the last line is an empty ``>>>`` prompt and there are
        more than ``after`` prompts on the screen."""
        def ready(_screen):
            lines = self.lines()
            prompts = sum(1 for line in lines if line.startswith(PROMPT))
            return lines if lines and lines[-1] == PROMPT and prompts > after else None
        return self.wait_for(f"prompt number {after + 1}", ready, timeout)

    def wait_for_exit(self, timeout: float = TIMEOUT) -> int:
        m = self.wait_for("the command to exit", lambda s: re.search(r"^EXIT=(\d+)$", s, re.M), timeout)
        return int(m[1])

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def start(*args) -> Terminal:
        term = Terminal([sys.executable, "-m", "edgeinfer", *[str(a) for a in args]])
        opened.append(term)
        return term

    try:
        yield start
    finally:
        for term in opened:
            term.close()


def prompts_on(lines: list[str]) -> int:
    return sum(1 for line in lines if line.startswith(PROMPT))


def stop_a_streaming_answer(term: Terminal, question: str) -> None:
    """Ask, see the answer grow between two looks, press Ctrl-C, and see
    '(stopped)' then a fresh prompt.

    For the tiny model, start the chat with LONG_ANSWER: it then runs to
    the end of its context (seconds) however fast it is, so Ctrl-C lands
    while it is still running.
    """
    before = prompts_on(term.wait_for_prompt())
    term.type(question)
    first = term.wait_for("the answer to start", lambda s: len(s) if question in s and
                          len(s.split(question, 1)[1].strip()) > 20 else None)
    term.wait_for("the answer to grow", lambda s: len(s) > first + 20)
    assert prompts_on(term.lines()) == before, "the answer ended before Ctrl-C"
    term.send("C-c")
    lines = term.wait_for_prompt(after=before)
    # The terminal echoes ^C where the cursor is, and on SIGINT it may drop
    # output still queued for the screen, so the note can come out clipped
    # ("(^C" then "topped)"); the callers check through /stats that the
    # answer was recorded as cancelled.
    assert any(line.endswith("opped)") for line in lines[-3:-1]), lines[-3:]


def last_stats(term: Terminal) -> re.Match:
    before = prompts_on(term.lines())
    term.type("/stats")
    term.wait_for_prompt(after=before)
    m = STATS.search(term.screen().rsplit("/stats", 1)[1])
    assert m, term.lines()[-3:]
    return m


# Every answer runs to the end of the 8192-token context (--ignore-eos): about
# 8,000 tokens, seconds of output even at the tiny model's speed, where the
# test needs milliseconds from seeing the answer grow to pressing Ctrl-C.
# Sampled hot with a fixed seed, so the stopped answer can be drawn again in
# this process; speculation off, since with it a seeded answer is a draw from
# the same distribution but not always the same draw (docs/python-api.md).
LONG_ANSWER = ("--ignore-eos", "--max-tokens", 100000, "--n-ctx", 8192, "--temperature", 1.5, "--seed", 7,
               "--speculative", "off")


def test_ctrl_c_stops_an_answer_and_keeps_it_then_ctrl_d_leaves(terminal, tiny_model, tmp_path):
    conv = tmp_path / "conv.json"
    term = terminal("chat", tiny_model, *LONG_ANSWER)

    lines = term.wait_for_prompt()
    assert lines[0] == "Chatting with tiny.gguf. /help for commands, Ctrl-D to leave."
    stop_a_streaming_answer(term, "Tell me a long story")

    stats = last_stats(term)
    prompt_tokens, _, generated, finish = int(stats[1]), int(stats[2]), int(stats[3]), stats[4]
    assert finish == "cancelled"
    assert 0 < generated < 8192 - prompt_tokens

    # the partial answer stays in the conversation, exactly as generated
    term.type(f"/save {conv}")
    term.wait_for_prompt(after=3)
    saved = json.loads(conv.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"]
    assert saved[0]["content"] == "Tell me a long story"
    with edgeinfer.load(tiny_model, n_ctx=8192, speculative="off") as engine:
        expected = engine.chat([{"role": "user", "content": "Tell me a long story"}],
                               temperature=1.5, seed=7, ignore_eos=True, max_tokens=generated)
    assert saved[1]["content"] == expected

    term.send("C-d")
    assert term.wait_for_exit() == 0


def test_the_chat_goes_on_after_a_stopped_answer(terminal, tiny_model):
    term = terminal("chat", tiny_model, *LONG_ANSWER)

    stop_a_streaming_answer(term, "Tell me a long story")
    term.type("/set max_tokens 5")
    term.wait_for_prompt(after=2)
    term.type("and then?")
    term.wait_for_prompt(after=3)
    stats = last_stats(term)
    # past end of turn too (--ignore-eos), so exactly 5 tokens, and the
    # prompt reused the stopped turn's KV state
    generated, finish = int(stats[3]), stats[4]
    assert (generated, finish) == (5, "length"), stats.group(0)
    assert int(stats[2]) > 0

    term.send("C-d")
    assert term.wait_for_exit() == 0


def test_ctrl_c_on_an_empty_prompt_leaves_with_0(terminal, tiny_model):
    term = terminal("chat", tiny_model)

    term.wait_for_prompt()
    term.send("C-c")

    assert term.wait_for_exit() == 0


def test_ctrl_c_with_text_on_the_line_only_clears_it(terminal, tiny_model):
    term = terminal("chat", tiny_model)

    term.wait_for_prompt()
    term.send("-l", "half a question")
    term.wait_for("the typed text", lambda s: "half a question" in s)
    term.send("C-c")
    lines = term.wait_for_prompt(after=1)
    assert not any(line.startswith("EXIT=") for line in lines)
    term.send("C-d")

    assert term.wait_for_exit() == 0


def test_a_triple_quoted_block_shows_continuation_prompts(terminal, tiny_model, tmp_path):
    conv = tmp_path / "conv.json"
    term = terminal("chat", tiny_model, "--max-tokens", 4, "--temperature", 0)

    term.wait_for_prompt()
    term.type('"""')
    term.wait_for("a continuation prompt", lambda s: s.rstrip().endswith("..."))
    term.type("line one")
    term.type('line two"""')
    term.wait_for_prompt(after=1)
    term.type(f"/save {conv}")
    term.wait_for_prompt(after=2)
    term.send("C-d")

    assert term.wait_for_exit() == 0
    saved = json.loads(conv.read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in saved if m["role"] == "user"] == ["line one\nline two"]


def test_a_missing_catalog_model_is_offered_and_pulled(terminal, tiny_model, edgeinfer_home):
    data = tiny_model.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    models = Path(os.environ["EDGEINFER_CONFIG"]) / "models"
    models.mkdir(parents=True)
    (models / "tiny.toml").write_text(
        f'name = "tiny"\ntag = "f32"\ndefault_tag = true\nfile = "tiny.gguf"\nsize = {len(data)}\n'
        f'sha256 = "{sha}"\nlicense = "MIT"\n\n[[sources]]\nkind = "file"\npath = "{tiny_model}"\n',
        encoding="utf-8")
    term = terminal("chat", "tiny")

    term.wait_for("the offer to pull", lambda s: "tiny:f32 is not downloaded yet (3 MB). Pull it now? [Y/n]" in s)
    term.send("Enter")
    lines = term.wait_for_prompt()
    assert "Chatting with tiny:f32. /help for commands, Ctrl-D to leave." in lines
    assert (edgeinfer_home / "blobs" / f"sha256-{sha}").read_bytes() == data
    term.send("C-d")

    assert term.wait_for_exit() == 0


def test_declining_the_pull_is_an_error_with_a_hint(terminal, tiny_model, edgeinfer_home):
    data = tiny_model.read_bytes()
    models = Path(os.environ["EDGEINFER_CONFIG"]) / "models"
    models.mkdir(parents=True)
    (models / "tiny.toml").write_text(
        f'name = "tiny"\ntag = "f32"\nfile = "tiny.gguf"\nsize = {len(data)}\n'
        f'sha256 = "{hashlib.sha256(data).hexdigest()}"\nlicense = "MIT"\n\n'
        f'[[sources]]\nkind = "file"\npath = "{tiny_model}"\n', encoding="utf-8")
    term = terminal("chat", "tiny")

    term.wait_for("the offer to pull", lambda s: "Pull it now? [Y/n]" in s)
    term.type("n")

    assert term.wait_for_exit() == 1
    assert "Error: model 'tiny' is not in the store - run 'edgeinfer pull tiny'" in term.screen()
    assert not (edgeinfer_home / "blobs").exists()


@pytest.mark.real_model
def test_real_model_answers_then_stops_on_ctrl_c(terminal, real_model_home):
    term = terminal("chat", "smollm2-135m-instruct", "--temperature", 0, "--max-tokens", 4000)

    lines = term.wait_for_prompt(timeout=180)
    assert lines[0].startswith("Chatting with smollm2-135m-instruct:q4_1.")
    term.type("What is the capital of France?")
    lines = term.wait_for_prompt(after=1, timeout=180)
    answer = lines[lines.index(">>> What is the capital of France?") + 1:-1]
    assert "Paris" in " ".join(answer)

    stop_a_streaming_answer(term, "Write a very long story about a dragon who learns to cook.")
    stats = last_stats(term)
    assert stats[4] == "cancelled"
    assert int(stats[2]) > 0  # the first turn's KV state was reused

    term.send("C-d")
    assert term.wait_for_exit() == 0
