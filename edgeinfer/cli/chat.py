"""``edgeinfer chat`` (an interactive REPL) and ``edgeinfer run`` (one shot)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import EdgeinferError
from ..events import DoneEvent, ToolCallEvent
from ..speculative import MODES
from ._common import ensure_model, load_engine

if TYPE_CHECKING:
    from ..chat import ChatSession

HELP = """\
Commands:
  /help              this list
  /reset             forget the conversation (the system prompt stays)
  /system TEXT       set the system prompt (and start over)
  /set NAME VALUE    sampling: temperature, top_k, top_p, min_p,
                     repeat_penalty, repeat_last_n, frequency_penalty,
                     presence_penalty, dry_multiplier, dry_base,
                     dry_allowed_length, dry_last_n, max_tokens, seed,
                     tool_choice (auto, none, required), parallel_tool_calls
  /stats             figures for the last answer
  /tools FILE        offer the tools in FILE (a JSON list, OpenAI's form);
                     /tools off stops offering them
  /result TEXT       answer the model's last tool call with TEXT
  /save FILE         save the conversation as JSON
  /load FILE         load a conversation saved with /save
  /exit              leave (so do Ctrl-D, and Ctrl-C on an empty line)
Write several lines between \"\"\" and \"\"\". Ctrl-C stops an answer."""


def _tool_choice(value: str) -> str:
    if value not in ("auto", "none", "required"):
        raise ValueError(value)
    return value


def _yes_no(value: str) -> bool:
    answers = {"true": True, "on": True, "yes": True, "false": False, "off": False, "no": False}
    if value.lower() not in answers:
        raise ValueError(value)
    return answers[value.lower()]


def settable() -> dict:
    """What /set can change, and the type of each value."""
    from ..sampling import OPTIONS

    return {**{k: kind for k, (kind, _) in OPTIONS.items()}, "max_tokens": int, "seed": int,
            "tool_choice": _tool_choice, "parallel_tool_calls": _yes_no}


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event):
    """Within the block, Ctrl-C sets ``event`` instead of raising
    KeyboardInterrupt.

    The REPL passes ``event`` to the stream as its ``cancel``: the
    scheduler thread, which runs llama.cpp, sees it within a step (during
    a long prefill too, through llama.cpp's abort callback), and the
    stream ends as usual with its DoneEvent, finish "cancelled". Raising
    KeyboardInterrupt instead would close the stream before that event
    arrives, and /stats would not see the stopped answer. Off the main
    thread, where no handler can be installed, Ctrl-C raises as before.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _spec(speculative: str | None, draft: str | None, yes: bool) -> dict:
    out = {"speculative": speculative} if speculative else {}
    if draft:
        out["draft"] = ensure_model(draft, yes, quiet=False)
    return out


def _sampling(temperature, top_k, top_p, max_tokens, seed, ignore_eos=False) -> dict:
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens, seed=seed,
                ignore_eos=ignore_eos or None)
    return {k: v for k, v in opts.items() if v is not None}


class Repl:
    """The interactive loop. ``read`` returns a line or raises EOFError /
    KeyboardInterrupt; ``out`` is where answers go."""

    def __init__(self, session: ChatSession, read, out=None, interactive: bool = True):
        self.session = session
        self.read = read
        self.out = out or sys.stdout
        self.interactive = interactive
        self.pending_eof = False

    def say(self, text: str) -> None:  # messages for the person, never mixed into answers
        print(text, file=self.out if self.interactive else sys.stderr, flush=True)

    def read_turn(self) -> tuple[str, bool]:
        """The next turn and whether it came as a \"\"\" block (a block is
        always text, even when it starts with '/')."""
        line = self.read(">>> " if self.interactive else "")
        if not line.lstrip().startswith('"""'):
            return line, False
        body = line.lstrip()[3:]
        if body.rstrip().endswith('"""') and len(body.strip()) >= 3:
            return body.rstrip()[:-3], True
        lines = [body]
        while True:
            try:
                nxt = self.read("... " if self.interactive else "")
            except EOFError:
                # Input ended inside a block: what was typed is still a turn.
                self.pending_eof = True
                return "\n".join(lines).strip("\n"), True
            if nxt.rstrip().endswith('"""'):
                lines.append(nxt.rstrip()[:-3])
                return "\n".join(lines).strip("\n"), True
            lines.append(nxt)

    def run(self) -> int:
        if self.interactive:
            self.say(f"Chatting with {self.session.engine.name}. /help for commands, Ctrl-D to leave.")
        while True:
            if self.pending_eof:
                return 0
            try:
                text, is_block = self.read_turn()
            except EOFError:
                if self.interactive:
                    self.say("")
                return 0
            except KeyboardInterrupt:
                if self.interactive and _line_buffer():
                    self.say("")
                    continue
                if self.interactive:
                    self.say("")
                return 0
            if not text.strip():
                continue
            if text.startswith("/") and not is_block:
                if self.command(text.strip()) == "exit":
                    return 0
                continue
            self.answer(text)

    def answer(self, text: str | None) -> None:
        stop = threading.Event()
        try:
            with ctrl_c_sets(stop), contextlib.closing(self.session.stream(text, cancel=stop)) as events:
                for ev in events:
                    if isinstance(ev, ToolCallEvent):
                        if ev.first:
                            self.out.write(f"[call {ev.name}(")
                        self.out.write(ev.arguments)
                        if ev.done:
                            self.out.write(")]\n")
                        self.out.flush()
                    elif not isinstance(ev, DoneEvent):
                        self.out.write(ev.text)
                        self.out.flush()
        except KeyboardInterrupt:
            # A Ctrl-C the handler could not take (the REPL off the main
            # thread), or one raised while a piece was printed: leaving the
            # stream cancelled the answer and waited for the engine to let go
            # of it, and the history holds what was shown.
            stop.set()
        except EdgeinferError as e:
            self.out.write("\n")
            self.say(f"Error: {e.one_line()}")
            return
        self.out.write("\n")
        self.out.flush()
        if stop.is_set():
            self.say("(stopped)")
        elif self.session.last_calls:
            self.say("(answer the call with /result TEXT)")

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/exit", "/bye", "/quit"):
            return "exit"
        if name in ("/help", "/?"):
            self.say(HELP)
        elif name == "/reset":
            s.reset()
            self.say("Conversation cleared.")
        elif name == "/system":
            if not arg:
                self.say(f"System prompt: {s.system or s.engine.system_prompt or '(none)'}  - set it with /system TEXT")
            else:
                s.system = arg
                s.reset()
                self.say("System prompt set; conversation cleared.")
        elif name == "/set":
            key, _, value = arg.partition(" ")
            kinds = settable()
            if key not in kinds or not value.strip():
                self.say(f"Usage: /set NAME VALUE, NAME one of {', '.join(kinds)}")
                return None
            try:
                s.options[key] = kinds[key](value.strip())
            except ValueError:
                example = {float: "0.7", int: "40", _yes_no: "off"}.get(kinds[key], "auto")
                self.say(f"'{value.strip()}' is not a valid {key} - try e.g. /set {key} {example}")
                return None
            self.say(f"{key} = {s.options[key]}")
        elif name == "/stats":
            st = s.last_stats
            if st is None:
                self.say("No answer yet - ask something first.")
            else:
                self.say(f"time to first token {st.ttft_s * 1000:.0f} ms, prefill {st.prefill_tps:.1f} tok/s, "
                         f"decode {st.decode_tps:.1f} tok/s, prompt {st.prompt_tokens} tokens "
                         f"({st.cached_tokens} cached), {st.generated_tokens} generated, "
                         f"finish: {st.finish_reason}")
        elif name == "/tools":
            self.tools(arg)
        elif name == "/result":
            pending = self.pending_call()
            if pending is None:
                self.say("No tool call is waiting for a result.")
            elif not arg:
                self.say(f"Usage: /result TEXT  (the result of {pending['function']['name']})")
            else:
                s.tool_result(pending["id"], arg)
                if self.pending_call() is None:   # every call answered: the model goes on
                    self.answer(None)
                else:
                    self.say(f"Now the result of {self.pending_call()['function']['name']}.")
        elif name == "/save":
            if not arg:
                self.say("Usage: /save FILE")
                return None
            try:
                s.save(Path(arg).expanduser())
                self.say(f"Saved {len(s.history)} messages to {arg}.")
            except OSError as e:
                self.say(f"Cannot save to {arg}: {e.strerror or e} - pick another path")
        elif name == "/load":
            if not arg:
                self.say("Usage: /load FILE")
                return None
            try:
                s.load(Path(arg).expanduser())
                self.say(f"Loaded {len(s.history)} messages from {arg}.")
            except EdgeinferError as e:
                self.say(f"Error: {e.one_line()}")
        else:
            self.say(f"Unknown command {name} - type /help for the list")
        return None


    def tools(self, arg: str) -> None:
        from ..tools import check_tools

        s = self.session
        if not arg:
            names = [t["function"]["name"] for t in s.tools or []]
            self.say(f"Tools: {', '.join(names) or '(none)'}  - offer some with /tools FILE")
        elif arg == "off":
            s.tools = None
            self.say("No tools offered.")
        else:
            try:
                s.tools = check_tools(json.loads(Path(arg).expanduser().read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                self.say(f"Cannot read tools from {arg}: {e} - give a JSON list of "
                         '{"type": "function", "function": {"name": ..., "parameters": {...}}}')
                return
            self.say(f"Offering {len(s.tools)} tool(s): {', '.join(t['function']['name'] for t in s.tools)}")

    def pending_call(self) -> dict | None:
        """The first call of the last assistant turn with no result yet."""
        h = self.session.history
        turn = next((i for i in range(len(h) - 1, -1, -1) if h[i]["role"] == "assistant"), None)
        if turn is None:
            return None
        answered = {m.get("tool_call_id") for m in h[turn + 1:] if m["role"] == "tool"}
        return next((c for c in h[turn].get("tool_calls", []) if c["id"] not in answered), None)


def _line_buffer() -> str:
    try:
        import readline

        return readline.get_line_buffer()
    except Exception:
        return ""


def _setup_readline() -> None:
    try:
        import atexit
        import readline

        from .. import paths

        hist = paths.home() / "chat_history"
        hist.parent.mkdir(parents=True, exist_ok=True)
        try:
            readline.read_history_file(hist)
        except OSError:
            pass
        readline.set_history_length(1000)
        atexit.register(lambda: _save_history(readline, hist))
    except ImportError:  # no readline on this platform: plain input() still works
        pass


def _save_history(readline, hist) -> None:
    try:
        readline.write_history_file(hist)
    except OSError:
        pass


_model_opts = [
    click.option("--n-ctx", type=int, help="Context size in tokens (default 4096; 2048 or 1024 on a box with "
                                           "under 3 or 1.5 GiB of memory, and never past the model's own "
                                           "context; 'edgeinfer doctor' shows this machine's)."),
    click.option("--threads", type=int, help="Threads for decoding (default: what 'edgeinfer tune' chose, else "
                                             "the physical cores, fewer while other work keeps them busy)."),
    click.option("--threads-batch", type=int, help="Threads for prompt processing (default: as --threads)."),
    click.option("--temperature", type=float, help="0 for greedy (default: the model's catalog setting, "
                                                   "else 0.8)."),
    click.option("--top-k", type=int),
    click.option("--top-p", type=float),
    click.option("--max-tokens", type=int, help="Longest answer in tokens (default 1024)."),
    click.option("--seed", type=int, help="Sampling seed, for reproducible answers."),
    click.option("--system", help="System prompt."),
    click.option("--speculative", type=click.Choice(MODES), default=None,
                 help="Speculative decoding: drafts checked in one batch (default auto: prompt-lookup "
                      "drafts as far as they pay here; draft needs --draft)."),
    click.option("--draft", metavar="MODEL", help="A smaller model with the same vocabulary that drafts "
                                                  "(e.g. qwen2.5-coder-0.5b-instruct for the 1.5B)."),
    click.option("--ignore-eos", is_flag=True,
                 help="Run every answer to --max-tokens or the end of the context, past the model's end of "
                      "turn (for benchmarks, and for tests that must stop an answer still running)."),
]


def _with_model_opts(f):
    for opt in reversed(_model_opts):
        f = opt(f)
    return f


@click.command("chat")
@click.argument("model", required=False)
@click.option("-y", "--yes", is_flag=True, help="Pull the model without asking if it is missing.")
@_with_model_opts
def chat_cmd(model, yes, n_ctx, threads, threads_batch, temperature, top_k, top_p, max_tokens, seed, system,
             speculative, draft, ignore_eos):
    """Chat with MODEL in the terminal (default: the catalog's default model).

    \b
    With stdin not a terminal, each line is a turn and only the answers
    are printed, so it scripts:
      printf 'Hi\\nWhat is 2+2?\\n' | edgeinfer chat

    \b
    Example:
      edgeinfer chat --yes
    """
    from ..chat import ChatSession

    interactive = sys.stdin.isatty()
    name = ensure_model(model, yes, quiet=False)
    engine = load_engine(name, n_ctx, threads, threads_batch, **_spec(speculative, draft, yes))
    try:
        session = ChatSession(engine, system=system, **_sampling(temperature, top_k, top_p,
                                                                 max_tokens or 1024, seed, ignore_eos))
        if interactive:
            _setup_readline()
            read = input
        else:
            def read(_prompt):
                line = sys.stdin.readline()
                if not line:
                    raise EOFError
                return line.rstrip("\n")
        code = Repl(session, read, sys.stdout, interactive).run()
    finally:
        engine.close()
    sys.exit(code)


@click.command("run")
@click.argument("args", nargs=-1, required=True, metavar="[MODEL] PROMPT")
@click.option("--json", "as_json", is_flag=True, help="Print the answer and its stats as JSON.")
@click.option("--raw", is_flag=True, help="Continue PROMPT as plain text, without the chat template "
                                          "(for base models).")
@click.option("-y", "--yes", is_flag=True, help="Pull the model without asking if it is missing.")
@_with_model_opts
def run_cmd(args, as_json, raw, yes, n_ctx, threads, threads_batch, temperature, top_k, top_p,
            max_tokens, seed, system, speculative, draft, ignore_eos):
    """Answer one PROMPT with MODEL (default: the one chosen for this
    machine) and exit. PROMPT '-' reads stdin.

    \b
    Examples:
      edgeinfer run "What is the capital of France?"
      edgeinfer run smollm2-135m-instruct "What is the capital of France?" --temperature 0
      edgeinfer run gemma-3-270m "The capital of France is" --raw
    """
    if len(args) > 2:
        raise click.UsageError("run takes [MODEL] PROMPT; quote a prompt that has spaces")
    model, prompt = (None, args[0]) if len(args) == 1 else args
    if prompt == "-":
        prompt = sys.stdin.read()
    model = ensure_model(model, yes, quiet=False)
    engine = load_engine(model, n_ctx, threads, threads_batch, **_spec(speculative, draft, yes))
    try:
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
        opts = _sampling(temperature, top_k, top_p, max_tokens or 1024, seed, ignore_eos)
        parts, stats = [], None
        # Ctrl-C raises KeyboardInterrupt in here; leaving the stream cancels
        # the answer and waits for the engine to let go of it.
        stream = engine.stream(prompt, **opts) if raw else engine.stream_chat(messages, **opts)
        with contextlib.closing(stream) as events:
            for ev in events:
                if isinstance(ev, DoneEvent):
                    stats = ev.stats
                else:
                    parts.append(ev.text)
                    if not as_json:
                        sys.stdout.write(ev.text)
                        sys.stdout.flush()
        if as_json:
            click.echo(json.dumps({"model": engine.name, "text": "".join(parts),
                                   "stats": stats.to_dict() if stats else None}, indent=2))
        else:
            sys.stdout.write("\n")
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.exit(130)
    finally:
        engine.close()


COMMANDS = [chat_cmd, run_cmd]
