"""The prompt cache: PromptCache on fake state bytes, then the Engine on
the tiny model, then `edgeinfer cache`.

The engine tests compare every cached request with the same request on an
engine built with ``prompt_cache=False``, which prefills each prompt from
scratch: a cache hit may only make the answer faster, never different.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeinfer import prompt_cache as pc
from edgeinfer.cli import cli
from edgeinfer.engine import DoneEvent, Engine
from edgeinfer.prompt_cache import MAGIC, PromptCache

N_CTX = 4096
GREEDY = dict(temperature=0)
MAX_TOKENS = 24
SUBPROCESS_TIMEOUT = 120

# About 860 tokens of the tiny model's vocabulary: longer than the disk
# threshold (128 tokens) and than one batch (512), shared by every question.
SYSTEM = " ".join(
    f"Rule {i}: when a person asks about the {topic}, answer with the facts you have read, "
    f"keep the answer short, and say so when the model does not know."
    for i, topic in enumerate(["weights", "memory", "tokens", "prompt", "program", "file",
                               "computer", "fan", "cores", "state", "question", "runtime"], 1))
QUESTIONS = ["What does the program read first?", "Why is a long conversation quick?",
             "How many cores does the small computer have?"]


def messages(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


# -- PromptCache on fake state bytes --------------------------------------------

def state_for(tokens, size: int = 64) -> bytes:
    """Bytes that differ per token list, standing in for a KV state."""
    seed = zlib.crc32(struct.pack(f"<{len(tokens)}i", *tokens)).to_bytes(4, "little")
    return (seed * (size // 4 + 1))[:size]


def kv_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.kv")) if root.exists() else []


def memory_cache(budget: int = 1 << 20) -> PromptCache:
    return PromptCache("unit", memory_budget=budget, disk=False)


def test_nearest_picks_the_longest_shared_prefix():
    cache = memory_cache()
    entries = {(1, 2, 3, 9, 9): b"a", (1, 2, 3, 4, 8): b"b", (7, 7): b"c"}
    for tokens, state in entries.items():
        cache.put(tokens, state)

    n, entry = cache.nearest([1, 2, 3, 4, 5])
    assert (n, entry.tokens, entry.state) == (4, (1, 2, 3, 4, 8), b"b")
    n, entry = cache.nearest([1, 2, 3, 9])
    assert (n, entry.state) == (4, b"a")
    n, entry = cache.nearest([7, 7, 7])
    assert (n, entry.state) == (2, b"c")
    assert cache.nearest([5, 1, 2]) is None
    assert cache.nearest([]) is None
    # at_least: only an entry sharing *more* than that many tokens counts
    assert cache.nearest([1, 2, 3, 4, 5], at_least=4) is None
    assert cache.nearest([1, 2, 3, 4, 5], at_least=3)[0] == 4


def test_memory_budget_evicts_the_least_recently_used():
    cache = memory_cache(budget=100)
    a, b, c = (1, 1), (2, 2), (3, 3)
    cache.put(a, b"a" * 40)
    cache.put(b, b"b" * 40)
    assert cache.nearest(a)[1].tokens == a  # a lookup makes `a` the most recent
    cache.put(c, b"c" * 40)                  # 120 bytes > 100: one entry must go

    assert len(cache) == 2
    assert cache.memory_bytes == 80
    assert cache.nearest(b) is None
    assert cache.nearest(a)[1].state == b"a" * 40
    assert cache.nearest(c)[1].state == b"c" * 40


def test_an_entry_larger_than_the_budget_is_not_kept():
    cache = memory_cache(budget=100)
    cache.put((1,), b"x" * 50)
    cache.put((2,), b"y" * 101)
    assert cache.nearest((2,)) is None
    assert cache.nearest((1,))[1].state == b"x" * 50


def test_an_entry_that_extends_another_replaces_it():
    cache = memory_cache()
    cache.put((1, 2, 3), b"short")
    cache.put((1, 2, 9), b"other")
    cache.put((1, 2, 3, 4), b"longer")

    assert len(cache) == 2                      # (1, 2, 3) went, (1, 2, 9) stays
    assert cache.memory_bytes == len(b"other") + len(b"longer")
    n, entry = cache.nearest((1, 2, 3))
    assert (n, entry.tokens, entry.state) == (3, (1, 2, 3, 4), b"longer")
    assert cache.nearest((1, 2, 9))[1].state == b"other"


def test_disk_write_only_from_disk_min_tokens_and_off_the_callers_path(tmp_path, monkeypatch):
    """put() returns before the file is written; flush() waits for it."""
    caller = threading.current_thread()
    release = threading.Event()
    synced_on: list[threading.Thread] = []
    real_fsync = os.fsync

    def held_fsync(fd):
        synced_on.append(threading.current_thread())
        if threading.current_thread() is not caller:   # on the caller's thread it must not hang the test
            assert release.wait(60)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    cache = PromptCache("ns", disk_min_tokens=4, root=tmp_path)
    short, long = [1, 2, 3], [1, 2, 3, 4]

    cache.put(short, state_for(short))
    cache.put(long, state_for(long))
    assert caller not in synced_on              # did not wait for the disk
    assert kv_files(tmp_path) == []             # nothing published yet
    release.set()
    cache.flush()

    assert synced_on and caller not in synced_on
    files = kv_files(tmp_path)
    assert len(files) == 1 and files[0].parent == tmp_path / "ns"
    assert not [p for p in (tmp_path / "ns").iterdir() if p.suffix != ".kv"]  # no temp file left
    assert [e["tokens"] for e in pc.disk_entries(tmp_path)] == [4]


def test_a_due_write_waits_while_the_model_works(tmp_path, monkeypatch):
    """A write waits for a gap in the model's work, up to BUSY_DEFER_S;
    flush() writes at once, busy or not."""
    monkeypatch.setattr(pc, "DISK_DELAY_S", 0.0)
    monkeypatch.setattr(pc, "BUSY_RECHECK_S", 0.01)
    working = threading.Event()
    working.set()
    cache = PromptCache("ns", disk_min_tokens=4, root=tmp_path)
    cache.busy = working.is_set
    tokens = [1, 2, 3, 4]

    cache.put(tokens, state_for(tokens))
    time.sleep(0.3)
    assert kv_files(tmp_path) == []             # due, but the model is working
    working.clear()
    deadline = time.monotonic() + 10
    while not kv_files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(kv_files(tmp_path)) == 1         # written in the gap

    working.set()
    other = [5, 6, 7, 8]
    cache.put(other, state_for(other))
    cache.flush()                               # a stop does not wait for a gap
    assert len(kv_files(tmp_path)) == 2

    monkeypatch.setattr(pc, "BUSY_DEFER_S", 0.2)  # nor does a write kept waiting long enough
    third = [9, 10, 11, 12]
    cache.put(third, state_for(third))
    deadline = time.monotonic() + 10
    while len(kv_files(tmp_path)) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(kv_files(tmp_path)) == 3


def test_a_fresh_cache_finds_the_disk_entry_and_another_namespace_does_not(tmp_path):
    tokens = list(range(10, 30))
    writer = PromptCache("ns", disk_min_tokens=8, root=tmp_path)
    writer.put(tokens, state_for(tokens, 5000))
    writer.flush()

    reader = PromptCache("ns", disk_min_tokens=8, root=tmp_path)
    assert len(reader) == 0                    # nothing in memory: the hit comes from disk
    n, entry = reader.nearest(tokens[:12] + [999])
    assert (n, entry.tokens, entry.state) == (12, tuple(tokens), state_for(tokens, 5000))
    assert len(reader) == 1                    # and is now in memory too

    other = PromptCache("other-ns", disk_min_tokens=8, root=tmp_path)
    assert other.nearest(tokens) is None
    assert len(kv_files(tmp_path)) == 1        # the first namespace's file is left alone


def test_disk_false_writes_nothing(tmp_path):
    cache = PromptCache("ns", disk=False, disk_min_tokens=1, root=tmp_path)
    cache.put([1, 2, 3], b"abc")
    cache.flush()
    assert kv_files(tmp_path) == []


# -- corrupt files ------------------------------------------------------------

def split_file(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    return json.loads(data[start:start + n]), data[start + n:]


def join_file(head: dict, state: bytes) -> bytes:
    raw = json.dumps(head).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + state


def with_header(**changes):
    def corrupt(data: bytes) -> bytes:
        head, state = split_file(data)
        return join_file({**head, **changes}, state)
    return corrupt


def flip(offset_from_end: int):
    def corrupt(data: bytes) -> bytes:
        i = len(data) - offset_from_end
        return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
    return corrupt


CORRUPTIONS = {
    "zero-length": lambda d: b"",
    "truncated in the magic": lambda d: d[:3],
    "truncated in the header length": lambda d: d[:len(MAGIC) + 2],
    "truncated in the header": lambda d: d[:len(MAGIC) + 20],
    "truncated in the state": lambda d: d[:len(d) - 1000],
    "last byte missing": lambda d: d[:-1],
    "a byte too many": lambda d: d + b"\0",
    "flipped byte in the state": flip(2000),
    "flipped last byte": flip(1),
    "garbage header": lambda d: d[:len(MAGIC) + 4] + b"\xff\xfe{not json" + d[len(MAGIC) + 14:],
    "header is not an object": lambda d: join_file([1, 2, 3], split_file(d)[1]),  # type: ignore[arg-type]
    "huge header length": lambda d: MAGIC + struct.pack("<I", 0xFFFFFFFF) + d[len(MAGIC) + 4:],
    "wrong magic": lambda d: b"XXXXX\n" + d[len(MAGIC):],
    "wrong namespace in header": with_header(namespace="another-namespace"),
    "wrong size in header": with_header(size=4999),
    "wrong crc in header": with_header(crc32=12345),
    "crc missing from header": with_header(crc32=None),
    "size of the wrong type": with_header(size="5000"),
    "random bytes": lambda d: os.urandom(len(d)),
}


def test_the_logits_go_to_disk_with_the_state_and_only_whole_files_count(tmp_path):
    tokens = list(range(100, 140))
    logits = struct.pack("<4f", 0.5, -1.0, 2.0, 0.0)
    writer = PromptCache("ns", disk_min_tokens=8, root=tmp_path)
    writer.put(tokens, state_for(tokens, 5000), logits)
    writer.flush()
    [path] = kv_files(tmp_path)

    reader = PromptCache("ns", root=tmp_path)
    assert reader.holds(tokens, logits=True)
    entry = reader.exact(tokens)
    assert (entry.state, entry.logits) == (state_for(tokens, 5000), logits)
    assert reader.exact(tokens[:-1]) is None and reader.exact(tokens + [1]) is None

    path.write_bytes(flip(2)(path.read_bytes()))   # a byte of the logits
    damaged = PromptCache("ns", root=tmp_path)
    assert damaged.exact(tokens) is None
    assert not path.exists()


def test_a_file_without_logits_is_used_and_then_rewritten_with_them(tmp_path):
    """Files written before logits were kept: their state still serves a
    prefix, exact() passes them by, and a put with logits replaces them."""
    tokens = list(range(100, 140))
    old = PromptCache("ns", disk_min_tokens=8, root=tmp_path)
    old.put(tokens, state_for(tokens, 5000))
    old.flush()
    [path] = kv_files(tmp_path)
    head, body = split_file(path.read_bytes())
    del head["logits"]                             # the header as it was written then
    path.write_bytes(join_file(head, body))

    cache = PromptCache("ns", disk_min_tokens=8, root=tmp_path)
    assert cache.nearest(tokens)[1].state == state_for(tokens, 5000)
    assert cache.holds(tokens) and not cache.holds(tokens, logits=True)
    assert cache.exact(tokens) is None
    cache.put(tokens, state_for(tokens, 5000), b"\0" * 8)
    cache.flush()
    assert PromptCache("ns", root=tmp_path).exact(tokens).logits == b"\0" * 8


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_file_is_deleted_and_ignored(tmp_path, corrupt):
    tokens = list(range(100, 140))
    writer = PromptCache("ns", disk_min_tokens=8, root=tmp_path)
    writer.put(tokens, state_for(tokens, 5000))
    writer.flush()
    [path] = kv_files(tmp_path)
    path.write_bytes(corrupt(path.read_bytes()))

    reader = PromptCache("ns", disk_min_tokens=8, root=tmp_path)
    assert reader.nearest(tokens) is None
    assert not path.exists()
    # and the cache still works: the same tokens are stored and found again
    reader.put(tokens, b"fresh")
    reader.flush()
    assert PromptCache("ns", root=tmp_path).nearest(tokens)[1].state == b"fresh"


def test_a_header_whose_tokens_are_not_numbers_is_deleted_and_ignored(tmp_path):
    tokens = list(range(100, 140))
    writer = PromptCache("ns", disk_min_tokens=8, root=tmp_path)
    writer.put(tokens, state_for(tokens, 5000))
    writer.flush()
    [path] = kv_files(tmp_path)
    path.write_bytes(with_header(tokens=[[t] for t in tokens])(path.read_bytes()))

    reader = PromptCache("ns", disk_min_tokens=8, root=tmp_path)
    assert reader.nearest(tokens) is None
    assert not path.exists()


def test_the_disk_budget_evicts_the_least_recently_used_files(tmp_path):
    state_size = 4000
    a, b, c, d = ([k] * 20 for k in (1, 2, 3, 4))
    cache = PromptCache("ns", disk_min_tokens=8, disk_budget=int(2.5 * state_size), root=tmp_path)
    now = time.time()

    def file_of(tokens) -> Path:
        [path] = [p for p in kv_files(tmp_path) if pc._read_header(p)["tokens"] == tokens]
        return path

    def age(tokens, seconds: float) -> None:
        os.utime(file_of(tokens), (now - seconds, now - seconds))

    for tokens in (a, b):
        cache.put(tokens, state_for(tokens, state_size))
        cache.flush()
    age(a, 300)
    age(b, 200)

    cache.put(c, state_for(c, state_size))       # three files do not fit: the oldest (a) goes
    cache.flush()
    assert len(kv_files(tmp_path)) == 2
    reader = PromptCache("ns", root=tmp_path)
    assert reader.nearest(a) is None
    age(c, 100)                                  # c newer than b ...
    assert reader.nearest(b)[1].state == state_for(b, state_size)  # ... until b is read

    cache.put(d, state_for(d, state_size))
    cache.flush()
    reader = PromptCache("ns", root=tmp_path)
    assert reader.nearest(c) is None
    assert reader.nearest(b)[1].state == state_for(b, state_size)
    assert reader.nearest(d)[1].state == state_for(d, state_size)
    assert sum(p.stat().st_size for p in kv_files(tmp_path)) <= 2.5 * state_size


def test_disk_entries_and_clear_disk(tmp_path):
    tmp_path = tmp_path / "prompt"
    cache = PromptCache("ns", disk_min_tokens=8, root=tmp_path)
    for k in (10, 20):   # two prompts that share nothing (one extending the other would replace it)
        cache.put(list(range(100 * k, 100 * k + k)), state_for(list(range(100 * k, 100 * k + k)), 1000))
    cache.flush()
    (tmp_path / "ns" / "junk.kv").write_bytes(b"junk")   # listed nowhere, cleared all the same

    entries = pc.disk_entries(tmp_path)
    assert sorted(e["tokens"] for e in entries) == [10, 20]
    assert all(e["namespace"] == "ns" and e["bytes"] > 1000 for e in entries)
    freed = pc.clear_disk(tmp_path)
    assert freed == sum(e["bytes"] for e in entries) + 4
    assert kv_files(tmp_path) == [] and pc.disk_entries(tmp_path) == []


# -- the Engine on the tiny model -------------------------------------------------

@pytest.fixture(scope="module")
def plain(tiny_model):
    """The baseline: no KV reuse at all, every prompt prefilled from scratch."""
    with Engine(tiny_model, n_ctx=N_CTX, threads=2, prompt_cache=False) as e:
        yield e


@pytest.fixture
def cached(tiny_model):
    with Engine(tiny_model, n_ctx=N_CTX, threads=2) as e:
        yield e


def run(engine: Engine, tokens: list[int]) -> tuple[str, list[int], int]:
    """Greedy text, generated ids and cached_tokens of one request."""
    events = list(engine.stream_tokens(tokens, max_tokens=MAX_TOKENS, **GREEDY))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    ids = [t for ev in events for t in ev.tokens]
    assert done.stats.generated_tokens == len(ids) > 0
    return "".join(ev.text for ev in events), ids, done.stats.cached_tokens


def expected(plain: Engine, tokens: list[int]) -> tuple[str, list[int]]:
    text, ids, cached_tokens = run(plain, tokens)
    assert cached_tokens == 0
    return text, ids


def common(a, b) -> int:
    return pc.common_prefix(a, b)


@pytest.fixture(scope="module")
def prompts(plain) -> list[list[int]]:
    """The chat prompts of QUESTIONS, all sharing the long system prompt."""
    ps = [plain.chat_tokens(messages(q)) for q in QUESTIONS]
    assert all(len(p) > 300 for p in ps)
    assert common(ps[0], ps[1]) > 280 and common(ps[0], ps[2]) > 280
    return ps


@pytest.fixture(scope="module")
def other(plain) -> list[int]:
    """An unrelated prompt, so the live KV state no longer helps."""
    return plain.tokenize("We walked to the market and bought a small fan for the computer.")


def test_exact_repeat_from_the_cache_matches_no_cache(cached, plain, prompts, other):
    a = prompts[0]
    first = run(cached, a)
    run(cached, other)                 # the live KV now holds something else
    again = run(cached, a)

    assert first[2] == 0
    assert again[2] == len(a)          # the whole prompt: its first token from the logits kept with it
    assert first[:2] == again[:2] == expected(plain, a)


SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.95, repeat_penalty=1.3, seed=1234)


def test_an_exact_repeat_reads_no_prompt_token_and_samples_as_a_cold_prefill(cached, plain, prompts, other):
    """The first token of a prompt the cache kept whole comes from the
    logits its last token gave when it was read, through the same chain
    (penalties and a seeded draw included): nothing is evaluated again,
    and every token is the one a cold prefill gives."""
    a = prompts[0]

    def sampled(engine):
        events = list(engine.stream_tokens(a, max_tokens=MAX_TOKENS, **SAMPLED))
        return [t for ev in events for t in ev.tokens], events[-1].stats

    want, _ = sampled(plain)
    run(cached, a)
    run(cached, other)
    read_before = cached.status()["prefill_tokens"]
    got, stats = sampled(cached)
    assert stats.cached_tokens == len(a)
    assert cached.status()["prefill_tokens"] == read_before
    assert got == want


def test_a_grammar_on_an_exact_repeat_reads_the_last_two_tokens_again(cached, plain, prompts):
    """A grammar draws through the context's own row, so its request
    evaluates the last two prompt tokens again, as before logits were kept."""
    a = prompts[0]
    digits = 'root ::= [0-9]+ " "'

    def constrained(engine):
        events = list(engine.stream_tokens(a, max_tokens=8, grammar=digits, **GREEDY))
        return "".join(ev.text for ev in events), events[-1].stats.cached_tokens

    want = constrained(plain)[0]
    run(cached, a)
    text, cached_tokens = constrained(cached)
    assert cached_tokens == len(a) - 2
    assert text == want


def test_a_different_question_after_the_same_system_prompt(cached, plain, prompts):
    """A / B / A: B reuses the live KV of A's system prompt; the second A
    is served by the cache, since the live KV then holds B."""
    a, b = prompts[0], prompts[1]
    shared = common(a, b)
    ra1, rb, ra2 = run(cached, a), run(cached, b), run(cached, a)

    assert ra1[2] == 0
    assert rb[2] == shared                    # the system prompt, from the live KV
    assert ra2[2] == len(a) > shared          # more than the live KV could give: the cache, whole
    assert ra1[:2] == ra2[:2] == expected(plain, a)
    assert rb[:2] == expected(plain, b)


def test_partial_prefix_hit_from_the_cache(cached, plain, prompts, other):
    """A cached entry longer than what the new prompt shares with it: its
    state is restored and cut back to the shared prefix.

    With llama.cpp's flash attention on, its CPU kernel takes another path
    for batches under 64 tokens, so the short tail evaluated after the
    reused prefix got other logits than in a cold prefill, and this answer
    changed; the engine now turns flash attention off by default."""
    a, c = prompts[0], prompts[2]
    run(cached, a)
    run(cached, other)
    text, ids, cached_tokens = run(cached, c)

    assert cached_tokens == common(a, c) > 0
    assert cached_tokens < len(a) - 1
    assert (text, ids) == expected(plain, c)


def test_prefix_of_a_cached_prompt(cached, plain, prompts, other):
    a = prompts[0]
    head = a[:200]
    run(cached, a)
    run(cached, other)
    text, ids, cached_tokens = run(cached, head)
    assert cached_tokens == len(head) - 2
    assert (text, ids) == expected(plain, head)


def test_disk_hit_in_a_fresh_engine(tiny_model, plain, prompts, edgeinfer_home):
    a, b = prompts[0], prompts[1]
    with Engine(tiny_model, n_ctx=N_CTX, threads=2) as first:
        run(first, a)
        first.prompt_cache.flush()
    assert [e["tokens"] for e in pc.disk_entries()] == [len(a)]
    assert kv_files(edgeinfer_home / "cache" / "prompt")

    with Engine(tiny_model, n_ctx=N_CTX, threads=2) as second:
        second.prompt_cache.flush()      # the preload of recent entries from disk, in a thread of its own
        assert len(second.prompt_cache) == 1
        text, ids, cached_tokens = run(second, b)
        assert cached_tokens == common(a, b)
        assert (text, ids) == expected(plain, b)
    with Engine(tiny_model, n_ctx=N_CTX, threads=2, cache_memory_budget=0) as third:   # nothing preloaded: from disk
        text, ids, cached_tokens = run(third, a)
        assert cached_tokens == len(a)       # the logits came from the file too
        assert (text, ids) == expected(plain, a)


FRESH_PROCESS = r"""
import json, sys
from edgeinfer.engine import Engine
path, n_ctx, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tokens = json.loads(sys.stdin.read())
with Engine(path, n_ctx=n_ctx, threads=2) as e:
    events = list(e.stream_tokens(tokens, max_tokens=max_tokens, temperature=0))
print(json.dumps({"text": "".join(ev.text for ev in events),
                  "ids": [t for ev in events for t in ev.tokens],
                  "cached_tokens": events[-1].stats.cached_tokens}))
"""


def in_fresh_process(model: Path, tokens: list[int]) -> dict:
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(model), str(N_CTX), str(MAX_TOKENS)],
                          input=json.dumps(tokens), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def other_prefix(tokens: list[int]) -> list[int]:
    return list(reversed(tokens[:50]))


def test_disk_hit_in_a_fresh_process(tiny_model, cached, plain, prompts):
    a, b = prompts[0], prompts[1]
    run(cached, a)
    cached.prompt_cache.flush()

    cold = in_fresh_process(tiny_model, other_prefix(b))   # shares nothing with a
    assert cold["cached_tokens"] == 0
    warm = in_fresh_process(tiny_model, b)

    assert warm["cached_tokens"] == common(a, b) > 0
    assert (warm["text"], warm["ids"]) == expected(plain, b)


CORRUPT_KV = {
    "truncated": lambda d: d[:len(d) // 2],
    "flipped byte in the state": flip(len(MAGIC) + 1),
    "state bytes shifted": lambda d: d[:-3000] + d[-2999:] + b"\0",
    "zero-length": lambda d: b"",
}


@pytest.mark.parametrize("corrupt", CORRUPT_KV.values(), ids=CORRUPT_KV.keys())
def test_a_corrupt_disk_file_never_changes_output(tiny_model, plain, prompts, corrupt):
    a = prompts[0]
    with Engine(tiny_model, n_ctx=N_CTX, threads=2) as first:
        run(first, a)
        first.prompt_cache.flush()
    [path] = kv_files(first.prompt_cache.dir)
    data = path.read_bytes()
    path.write_bytes(corrupt(data))

    # A prefix under the disk threshold: a hit would have come from the
    # corrupt file, and no new file is written for it afterwards.
    head = a[:100]
    with Engine(tiny_model, n_ctx=N_CTX, threads=2) as second:
        text, ids, cached_tokens = run(second, head)
        second.prompt_cache.flush()
    assert cached_tokens == 0
    assert (text, ids) == expected(plain, head)
    assert not path.exists()


def test_a_damaged_token_id_in_the_header_is_not_trusted(tiny_model, plain, prompts):
    a = prompts[0]
    with Engine(tiny_model, n_ctx=N_CTX, threads=2) as first:
        run(first, a)
        first.prompt_cache.flush()
    [path] = kv_files(first.prompt_cache.dir)
    head, state = split_file(path.read_bytes())
    # One token id in the header turns into another, as one bad digit would
    # (the JSON stays valid): the state is still a's, the header names other tokens.
    i = 200
    damaged = list(a)
    damaged[i] = a[i] + 1
    path.write_bytes(join_file({**head, "tokens": damaged}, state))

    with Engine(tiny_model, n_ctx=N_CTX, threads=2) as second:
        text, ids, cached_tokens = run(second, damaged)
    # No state on disk was ever computed for damaged[i], so nothing past it can be reused.
    assert cached_tokens <= i
    assert (text, ids) == expected(plain, damaged)


def test_the_cache_disabled_never_reuses_anything(tiny_model, plain, prompts, edgeinfer_home):
    a, b = prompts[0], prompts[1]
    with Engine(tiny_model, n_ctx=N_CTX, threads=2, prompt_cache=False) as e:
        assert e.prompt_cache is None
        results = [run(e, p) for p in (a, a, b, a)]
    assert [r[2] for r in results] == [0, 0, 0, 0]
    assert results[0][:2] == results[1][:2] == results[3][:2] == expected(plain, a)
    assert results[2][:2] == expected(plain, b)
    assert kv_files(edgeinfer_home) == []


def test_cache_disk_false_keeps_the_cache_in_memory(tiny_model, plain, prompts, other, edgeinfer_home):
    a = prompts[0]
    with Engine(tiny_model, n_ctx=N_CTX, threads=2, cache_disk=False) as e:
        run(e, a)
        run(e, other)
        text, ids, cached_tokens = run(e, a)
        e.prompt_cache.flush()
    assert cached_tokens == len(a)
    assert (text, ids) == expected(plain, a)
    assert kv_files(edgeinfer_home) == []


def test_an_engine_takes_a_prompt_cache_object(tiny_model, plain, prompts, tmp_path):
    a, c = prompts[0], prompts[1]
    with Engine(tiny_model, n_ctx=N_CTX, threads=2) as default:
        namespace = default.prompt_cache.namespace
    cache = PromptCache(namespace, root=tmp_path / "pc")
    with Engine(tiny_model, n_ctx=N_CTX, threads=2, prompt_cache=cache) as e:
        assert e.prompt_cache is cache
        run(e, a)
    cache.flush()
    assert [p.parent.name for p in kv_files(tmp_path / "pc")] == [namespace]
    with Engine(tiny_model, n_ctx=N_CTX, threads=2,
                prompt_cache=PromptCache(namespace, root=tmp_path / "pc")) as e:
        text, ids, cached_tokens = run(e, c)
    assert cached_tokens == common(a, c)
    assert (text, ids) == expected(plain, c)


def test_cache_namespace_is_the_namespace_of_the_engines_cache(cached):
    assert cached.cache_namespace() == cached.prompt_cache.namespace


def test_flash_attention_has_its_own_namespace(tiny_model, cached):
    with Engine(tiny_model, n_ctx=N_CTX, threads=2, flash_attn=True) as fa:
        assert fa.prompt_cache.namespace == fa.cache_namespace() != cached.prompt_cache.namespace


def test_another_context_size_does_not_share_states(tiny_model, plain, prompts):
    a = prompts[0]
    with Engine(tiny_model, n_ctx=N_CTX, threads=2) as first:
        run(first, a)
        first.prompt_cache.flush()
    with Engine(tiny_model, n_ctx=N_CTX // 2, threads=2) as second:
        assert second.prompt_cache.namespace != first.prompt_cache.namespace
        assert run(second, a)[2] == 0


# -- edgeinfer cache -------------------------------------------------------------

def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_cache_list_and_clear(cached, prompts, edgeinfer_home):
    empty = invoke("cache", "list")
    assert empty.exit_code == 0 and "The prompt cache is empty." in empty.stdout

    run(cached, prompts[0])
    cached.prompt_cache.flush()   # else the second, sharing 90 % of it, would be written in its place
    run(cached, prompts[1])
    cached.prompt_cache.flush()
    namespace = cached.prompt_cache.namespace

    listed = invoke("cache", "list")
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == 3
    assert sorted(int(line.split()[1]) for line in lines[:2]) == sorted(map(len, prompts[:2]))
    assert all(line.startswith(namespace) for line in lines[:2])
    assert lines[2].startswith("2 entries, ")

    as_json = invoke("cache", "list", "--json")
    assert as_json.exit_code == 0
    entries = json.loads(as_json.stdout)
    assert sorted(e["tokens"] for e in entries) == sorted(map(len, prompts[:2]))
    assert {e["namespace"] for e in entries} == {namespace}
    assert all(Path(e["path"]).is_file() and Path(e["path"]).stat().st_size == e["bytes"] for e in entries)

    cleared = invoke("cache", "clear")
    assert cleared.exit_code == 0 and cleared.stdout.startswith("Cleared the prompt cache")
    assert kv_files(edgeinfer_home) == []
    assert json.loads(invoke("cache", "list", "--json").stdout) == []
    assert "empty" in invoke("cache", "list").stdout


def test_cache_budgets_are_options_of_load(tiny_model):
    import edgeinfer

    with edgeinfer.load(tiny_model, threads=1, cache_memory_budget=12345, cache_disk_budget=678) as e:
        assert (e.prompt_cache.memory_budget, e.prompt_cache.disk_budget) == (12345, 678)
    with edgeinfer.load(tiny_model, threads=1) as e:
        assert e.prompt_cache.memory_budget == pc.default_memory_budget()
        assert e.prompt_cache.disk_budget == pc.DEFAULT_DISK_BUDGET
