"""Fill-in-the-middle in the engine, on the tiny model built with
Qwen2.5-Coder's FIM tokens: the prompt's layout in the model's own tokens,
a model without them refused, the rules that shape an answer for an
editor, and typing at the cursor re-reading only what was typed."""

from __future__ import annotations

import pytest

from edgeinfer.engine import Engine
from edgeinfer.errors import FimUnsupportedError, RequestError
from edgeinfer.fim import EditorFit, check_extra

PREFIX = "def add(a, b):\n    total = a"
SUFFIX = "\n    return total\n\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def engine(tiny_fim_model):
    with Engine(tiny_fim_model, n_ctx=2048, threads=1) as e:
        yield e


def special(engine, text: str) -> int:
    (tok,) = engine.tokenize(text, add_bos=False, special=True)
    return tok


def test_the_prompt_is_prefix_suffix_middle_in_the_models_tokens(engine):
    ids = engine.infill_tokens(PREFIX, SUFFIX)
    pre, suf, mid = (special(engine, t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
    assert ids.count(pre) == ids.count(suf) == ids.count(mid) == 1
    assert ids[0] == pre and ids.index(pre) < ids.index(suf) < ids.index(mid)
    text = engine.detokenize(ids, special=True)
    # The cursor's line goes after the middle token: typing in it changes only the end.
    assert text == ("<|fim_prefix|>def add(a, b):\n<|fim_suffix|>" + SUFFIX + "<|fim_middle|>    total = a")


def test_other_files_come_first_in_the_repository_format(engine):
    extra = check_extra([{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"},
                         {"filename": "b.py", "text": "X = 1\n"}])
    text = engine.detokenize(engine.infill_tokens(PREFIX, SUFFIX, extra=extra), special=True)
    assert text.startswith("<|repo_name|>project\n<|file_sep|>util.py\ndef sub(a, b):\n    return a - b\n"
                           "<|file_sep|>b.py\nX = 1\n<|file_sep|>file\n<|fim_prefix|>")
    # A small budget drops the earliest chunks first, then cuts the prefix's start and the suffix's end.
    short = engine.detokenize(engine.infill_tokens(PREFIX * 50, SUFFIX * 50, extra=extra, max_tokens=1900),
                              special=True)
    assert "util.py" not in short and short.count("<|fim_prefix|>") == 1
    assert len(engine.infill_tokens(PREFIX * 50, SUFFIX * 50, extra=extra, max_tokens=1900)) <= 2048 - 1900


def test_a_family_found_by_token_text_without_repository_tokens(tmp_path):
    """DeepSeek Coder's FIM tokens, which llama.cpp finds by their text (the
    GGUF names none): the same layout, and other files' chunks as plain
    text before it, since the family has no repository tokens."""
    from conftest import load_script

    path = load_script("build_tiny_model").build(tmp_path / "tiny-deepseek.gguf", fim="deepseek")
    with Engine(path, n_ctx=1024, threads=1, prompt_cache=False) as e:
        text = e.detokenize(e.infill_tokens(PREFIX, SUFFIX, extra=[("util.py", "X = 1\n")]), special=True)
        assert text == ("X = 1\n<｜fim▁begin｜>def add(a, b):\n<｜fim▁hole｜>" + SUFFIX + "<｜fim▁end｜>    total = a")
        answer = e.infill(PREFIX, SUFFIX, max_tokens=6, temperature=0)
        assert isinstance(answer, str) and "<｜" not in answer


def test_input_extra_is_checked_by_name():
    with pytest.raises(RequestError) as info:
        check_extra([{"filename": "a.py"}])
    assert info.value.param == "input_extra[0]"


def test_a_model_without_fim_tokens_is_refused_with_what_to_use(tiny_model):
    with Engine(tiny_model, n_ctx=256, threads=1) as e, pytest.raises(FimUnsupportedError) as info:
        e.infill("def f():\n    ", "\n")
    assert "qwen2.5-coder" in info.value.hint


@pytest.mark.parametrize("pieces, kw, out", [
    (["    x = 1\n", "    y = 2\n", "    z = 3\n"], {"max_lines": 2}, "    x = 1\n    y = 2"),
    (["1\n    y = 2\n", "print(y)\n"], {"dedent": True}, "1\n    y = 2"),          # a line left the block
    (["1\n    s = a + b\n", "    return total\n"], {}, "1\n    s = a + b"),        # the suffix has that line
    (["1\n\n    s = 2\n\n", "\n"], {}, "1\n\n    s = 2"),   # no blank line the suffix's new line repeats
    (["1 + b"], {}, "1 + b"),
])
def test_an_answer_is_shaped_for_an_editor(pieces, kw, out):
    fit = EditorFit("def f(a, b):\n    total = ", SUFFIX, **kw)
    given = ""
    for p in pieces:
        text, stopped = fit.feed(p)
        given += text
        if stopped:
            break
    assert given + fit.finish() == out


def test_a_tail_the_suffix_starts_with_is_left_out():
    fit = EditorFit("print(add(1, 2", ")\n", max_lines=1)
    text, _ = fit.feed("))")
    assert text + fit.finish() == ")"          # the suffix has the second ")" already
    fit = EditorFit("x = ", "1 + y\n")
    assert fit.feed("1")[0] + fit.finish() == "1"   # a single word character is no overlap


def test_typing_at_the_cursor_reads_only_what_was_typed(engine):
    first = list(engine.stream_infill(PREFIX, SUFFIX, temperature=0, max_tokens=8))
    assert first[-1].stats.finish_reason in ("stop", "length")
    typed = list(engine.stream_infill(PREFIX + " +", SUFFIX, temperature=0, max_tokens=8))
    st = typed[-1].stats
    assert st.prompt_tokens - st.cached_tokens <= 3, st    # the typed token, and the two always evaluated
    assert all(not e.text.count("\n") > 1 for e in typed[:-1])


def test_a_new_line_keeps_the_middle_where_it_began_and_rereads_only_the_new_lines(engine):
    list(engine.stream_infill(PREFIX, SUFFIX, temperature=0, max_tokens=4))
    new = " + b\n    total += 1\n    "
    st = list(engine.stream_infill(PREFIX + new, SUFFIX, temperature=0, max_tokens=4))[-1].stats
    # The new lines (and the two always read again), not the suffix after them.
    assert st.prompt_tokens - st.cached_tokens <= len(engine.tokenize(new, add_bos=False)) + 3, st
    typed = PREFIX + new
    text = engine.detokenize(engine.infill_tokens(typed, SUFFIX), special=True)
    assert text.endswith("<|fim_middle|>    total = a + b\n    total += 1\n    ")
    # Another file (another suffix) starts its middle at its own cursor's line.
    other = engine.detokenize(engine.infill_tokens(typed, "\nprint(1)\n"), special=True)
    assert other.endswith("<|fim_middle|>    ")


def test_a_suffix_on_completions_through_the_openai_client(tiny_fim_model, tiny_model, tmp_path):
    import openai
    from served import start_http

    env = {"EDGEINFER_HOME": str(tmp_path), "EDGEINFER_TOKEN": ""}
    s = start_http(tiny_fim_model, "--n-ctx", "1024", "--model", str(tiny_model), env=env)
    try:
        client = s.openai()
        r = client.completions.create(model="tiny-fim.gguf", prompt=PREFIX, suffix=SUFFIX, max_tokens=12,
                                      temperature=0)
        with Engine(tiny_fim_model, n_ctx=1024, threads=1) as e:
            assert r.choices[0].text == e.infill(PREFIX, SUFFIX, max_tokens=12, temperature=0)
        with pytest.raises(openai.BadRequestError) as info:   # a model without FIM tokens says so
            client.completions.create(model="tiny.gguf", prompt=PREFIX, suffix=SUFFIX, max_tokens=4)
        assert info.value.body["param"] == "suffix" and "fill-in-the-middle" in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:   # a chat has no suffix
            client.chat.completions.create(model="tiny-fim.gguf", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=4, extra_body={"suffix": "}"})
        assert info.value.body["param"] == "suffix"
    finally:
        assert s.stop() == 0
