"""Cache files are input like any other: a crafted, damaged or foreign one
is dropped and never fails a request, and a writer killed mid-write leaves
nothing that lives on."""

from __future__ import annotations

import json
import os
import struct

from edgeinfer import prompt_cache
from edgeinfer.prompt_cache import MAGIC, PromptCache, _checksum, disk_entries

NS = "n" * 24
TOKENS = list(range(1, 200))


def write(path, head, state=b"x" * 16, raw_head: bytes | None = None) -> None:
    data = raw_head if raw_head is not None else json.dumps(head).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(data)) + data + state)


def sound(tokens=TOKENS, state=b"x" * 16) -> dict:
    return {"namespace": NS, "tokens": tokens, "size": len(state), "crc32": _checksum(tuple(tokens), state)}


def crafted(d) -> dict:
    """name → what it does wrong."""
    files = {
        "absurd-size": {**sound(), "size": 10 ** 18},
        "negative-size": {**sound(), "size": -5},
        "huge-token": {**sound(), "tokens": [*TOKENS[:10], 2 ** 40]},
        "negative-token": {**sound(), "tokens": [*TOKENS[:10], -1]},
        "float-token": {**sound(), "tokens": [*TOKENS[:10], 1.5]},
        "bad-crc": {**sound(), "crc32": 2 ** 40},
        "no-namespace": {k: v for k, v in sound().items() if k != "namespace"},
    }
    for name, head in files.items():
        write(d / f"{name}.kv", head)
    write(d / "deep.kv", None, raw_head=b"[" * 100_000 + b"]" * 100_000)
    write(d / "not-json.kv", None, raw_head=b"\xff\xfe{")
    (d / "a-directory.kv").mkdir()
    (d / "truncated.kv").write_bytes(MAGIC + b"\x01")
    return files


def test_crafted_files_are_dropped_and_never_fail_a_lookup(tmp_path):
    d = tmp_path / NS
    d.mkdir()
    crafted(d)
    write(d / "good.kv", sound())
    cache = PromptCache(NS, root=tmp_path, memory_budget=1 << 20)
    hit = cache.nearest(TOKENS + [7, 8])
    assert hit is not None and hit[0] == len(TOKENS) and hit[1].state == b"x" * 16
    left = sorted(p.name for p in d.iterdir())
    assert left == ["a-directory.kv", "good.kv"], left   # a directory is left alone, and skipped
    assert [e["tokens"] for e in disk_entries(tmp_path)] == [len(TOKENS)]


def test_cache_list_reads_past_crafted_files(tmp_path):
    d = tmp_path / NS
    d.mkdir()
    crafted(d)
    assert disk_entries(tmp_path) == []


def test_a_killed_writers_temporary_file_is_removed_and_a_live_ones_kept(tmp_path):
    d = tmp_path / NS
    d.mkdir()
    dead = 2 ** 22 + 12345   # past the default pid_max: no such process
    (d / f".abc.{dead}.1.tmp").write_bytes(b"x" * 100)
    (d / f".def.{os.getpid()}.1.tmp").write_bytes(b"y")
    PromptCache(NS, root=tmp_path).nearest([1, 2, 3])
    assert sorted(p.name for p in d.iterdir()) == [f".def.{os.getpid()}.1.tmp"]


def test_unfinished_writes_count_in_the_disk_budget(tmp_path):
    d = tmp_path / NS
    d.mkdir()
    (d / f".live.{os.getpid()}.1.tmp").write_bytes(b"t" * 3000)
    cache = PromptCache(NS, root=tmp_path, disk_budget=4000, disk_min_tokens=1)
    cache.put([1, 2, 3], b"s" * 2000)
    cache.flush()
    # 3,000 being written + a 2,000-byte entry is over 4,000: the entry
    # goes, the write under way is left to finish.
    assert [p.name for p in d.iterdir()] == [f".live.{os.getpid()}.1.tmp"]
    cache = PromptCache(NS, root=tmp_path, disk_budget=prompt_cache.DEFAULT_DISK_BUDGET, disk_min_tokens=1)
    cache.put([1, 2, 3], b"s" * 2000)
    cache.flush()
    assert len(list(d.glob("*.kv"))) == 1


def test_a_preload_reads_the_newest_entries_into_memory_and_leaves_their_times(tmp_path):
    first = PromptCache("ns", root=tmp_path, disk_min_tokens=1)
    for i in range(3):
        first.put(tuple(range(i, i + 200)), bytes([i]) * 1000)
    first.flush()
    paths = sorted((tmp_path / "ns").glob("*.kv"))
    for age, p in enumerate(paths):
        os.utime(p, (1_000_000 + age, 1_000_000 + age))       # the last path the newest
    times = {p: p.stat().st_mtime for p in paths}

    second = PromptCache("ns", root=tmp_path, disk_min_tokens=1)
    size = paths[0].stat().st_size
    second.preload(most=2 * size + size // 2).join()          # room for two of the three files
    assert len(second) == 2 and second.memory_bytes == 2000
    assert {e.path for e in second._mem.values()} == set(paths[1:])   # the two newest
    assert {p: p.stat().st_mtime for p in paths} == times     # a preload is not a use
