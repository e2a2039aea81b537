"""Thread profiles: candidates, the sweep on the tiny model, the choice,
profiles on disk and their use by the engine, and `edgeinfer tune /
bench / doctor`.

The tiny model is imported into each test's store, so it has a sha256 and
a profile can be keyed by it.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import edgeinfer
from edgeinfer import hardware, tuning
from edgeinfer.cli import cli
from edgeinfer.engine import Engine
from edgeinfer.tuning import Measurement

NAME = "tiny:f16"


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def model(tiny_model):
    """The tiny model imported into this test's store: its manifest."""
    return edgeinfer.import_file(tiny_model, NAME)


def ctx_threads(engine) -> tuple[int, int]:
    """The thread counts llama.cpp's context really has."""
    return engine._ctx.threads()


def save(engine_sha256: str, threads: int, threads_batch: int, fingerprint: str | None = None):
    ms = [Measurement(t, prefill_tps=100.0 * (t == threads_batch) + 10, decode_tps=100.0 * (t == threads) + 10)
          for t in sorted({1, 2, threads, threads_batch})]
    profile = tuning.Profile(fingerprint=fingerprint or hardware.fingerprint(), sha256=engine_sha256,
                             model=NAME, threads=threads, threads_batch=threads_batch,
                             default_threads=hardware.default_threads(), measurements=ms)
    return profile, tuning.save_profile(profile)


# -- candidates and the choice ----------------------------------------------------

@pytest.mark.parametrize("usable, default, logical, quota, expected", [
    (2, 2, [0, 1], None, [1, 2]),
    (2, 2, [0, 1, 2, 3], None, [1, 2, 4]),          # hyper-threads: try the logical count too
    (2, 2, [0, 1, 2, 3], 2.0, [1, 2]),              # ... unless the quota forbids it
    (8, 4, list(range(8)), None, list(range(1, 9))),  # big.LITTLE: the big count is among them
    (1, 1, [3], None, [1]),
])
def test_candidates(monkeypatch, usable, default, logical, quota, expected):
    monkeypatch.setattr(hardware, "usable_cores", lambda: usable)
    monkeypatch.setattr(hardware, "default_threads", lambda: default)
    monkeypatch.setattr(hardware, "affinity_cpus", lambda: logical)
    monkeypatch.setattr(hardware, "cgroup_cpu_quota", lambda: quota)
    assert tuning.candidates() == expected


def test_candidates_on_this_machine():
    cands = tuning.candidates()
    assert cands[0] == 1 and cands == sorted(set(cands))
    assert hardware.default_threads() in cands
    assert max(cands) <= len(hardware.affinity_cpus())


def ms(**decode) -> list[Measurement]:
    return [Measurement(int(t), prefill_tps=v, decode_tps=v) for t, v in decode.items()]


@pytest.mark.parametrize("figures, chosen", [
    ({"1": 100.0, "2": 101.5, "3": 90.0}, 1),      # 2 is only 1.5 % faster: fewer threads win
    ({"1": 100.0, "2": 103.0}, 2),                 # 3 % faster is worth a thread
    ({"1": 50.0, "2": 100.0, "4": 101.0}, 2),
    ({"2": 100.0, "4": 99.0, "1": 10.0}, 2),
    ({"4": 100.0}, 4),
])
def test_choose_prefers_fewer_threads_within_two_percent(figures, chosen):
    assert tuning.choose(ms(**figures), "decode_tps") == chosen


def test_profile_gaps():
    p = tuning.Profile(fingerprint="f", sha256="s", model="m", threads=1, threads_batch=2, default_threads=4,
                       measurements=[Measurement(1, 50.0, 99.0), Measurement(2, 100.0, 100.0),
                                     Measurement(4, 80.0, 90.0)])
    g = p.gaps()
    assert g["decode_tps"]["best"] == 100.0 and g["decode_tps"]["chosen"] == 99.0
    assert g["decode_tps"]["chosen_gap"] == pytest.approx(0.01)
    assert g["decode_tps"]["default_gap"] == pytest.approx(0.10)
    assert g["prefill_tps"]["chosen_gap"] == 0.0
    assert g["prefill_tps"]["default_gap"] == pytest.approx(0.20)
    p.default_threads = 3                          # never measured
    assert p.gaps()["decode_tps"]["default_gap"] is None


# -- the sweep ------------------------------------------------------------------------

def test_sweep_measures_every_candidate(model):
    steps = []
    with edgeinfer.load(NAME, n_ctx=512, threads=1, prompt_cache=False) as engine:
        before = (engine.threads, engine.threads_batch, ctx_threads(engine))
        result = tuning.sweep(engine, n_prompt=32, n_gen=8, reps=1,
                              on_step=lambda done, total, t: steps.append((done, total, t)))
        after = (engine.threads, engine.threads_batch, ctx_threads(engine))
    cands = tuning.candidates()

    assert [m.threads for m in result] == cands
    for m in result:
        assert m.prefill_tps > 0 and m.decode_tps > 0
        assert len(m.prefill_runs) == len(m.decode_runs) == 1
        assert m.prefill_tps == m.prefill_runs[0]
    total = 2 * len(cands)                         # a warm-up and one timed run each
    assert [s[0] for s in steps] == list(range(1, total + 1))
    assert {s[1] for s in steps} == {total}
    assert [s[2] for s in steps] == [t for t in cands for _ in range(2)]
    assert after == before                        # the engine's own threads are back


def test_sweep_with_given_threads_and_reps(model):
    with edgeinfer.load(NAME, n_ctx=512, prompt_cache=False) as engine:
        result = tuning.sweep(engine, threads=[2, 1], n_prompt=16, n_gen=4, reps=3)
    assert [m.threads for m in result] == [2, 1]
    assert all(len(m.prefill_runs) == 3 and sorted(m.decode_runs)[1] == m.decode_tps for m in result)


# -- profiles and the engine ------------------------------------------------------------

def test_a_saved_profile_is_used_by_load(model):
    _, path = save(model.sha256, threads=1, threads_batch=2)
    assert path.parent == tuning.profiles_dir()
    loaded = tuning.load_profile(model.sha256)
    assert (loaded.threads, loaded.threads_batch, loaded.fingerprint) == (1, 2, hardware.fingerprint())
    assert [p.sha256 for p in tuning.list_profiles()] == [model.sha256]

    with edgeinfer.load(NAME) as engine:
        assert engine.threads_source == "tuned"
        assert (engine.threads, engine.threads_batch) == (1, 2)
        assert ctx_threads(engine) == (1, 2)
        assert engine.generate("The weather was", max_tokens=4, temperature=0)


def test_make_profile_from_a_sweep_round_trips(model):
    with edgeinfer.load(NAME, n_ctx=512, prompt_cache=False) as engine:
        result = tuning.sweep(engine, threads=[1, 2], n_prompt=16, n_gen=4, reps=1)
        profile = tuning.make_profile(engine, result)
    assert profile.sha256 == model.sha256 and profile.model == engine.name
    assert profile.threads == tuning.choose(result, "decode_tps")
    assert profile.threads_batch == tuning.choose(result, "prefill_tps")
    tuning.save_profile(profile)
    assert tuning.load_profile(model.sha256) == profile


def test_explicit_threads_override_the_profile(model):
    save(model.sha256, threads=1, threads_batch=1)
    with edgeinfer.load(NAME, threads=2) as engine:
        assert engine.threads_source == "given"
        assert (engine.threads, engine.threads_batch) == (2, 2)
        assert ctx_threads(engine) == (2, 2)
    with edgeinfer.load(NAME, threads_batch=2) as engine:
        assert engine.threads_source == "given"
        assert engine.threads_batch == 2


def test_without_a_profile_the_default_is_used(model):
    with edgeinfer.load(NAME) as engine:
        assert engine.threads_source == "default"
        assert engine.threads == engine.threads_batch == hardware.default_threads()


def test_a_profile_of_another_machine_or_model_is_not_used(model, tiny_model):
    save(model.sha256, threads=1, threads_batch=1, fingerprint="0" * 16)
    save("f" * 64, threads=1, threads_batch=1)
    with edgeinfer.load(NAME) as engine:
        assert engine.threads_source == "default"
    save(model.sha256, threads=1, threads_batch=1)
    with edgeinfer.load(str(tiny_model)) as engine:     # a bare path has no sha256
        assert engine.threads_source == "default"


DAMAGED = {
    "garbage": b"\x00\xffnot json",
    "empty": b"",
    "truncated": None,                      # the real file, cut in half
    "a list": b"[1, 2, 3]",
    "a string": b'"threads"',
    "missing keys": b'{"threads": 1}',
    "bad measurement": None,
}


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_profile_is_ignored(model, kind):
    _, path = save(model.sha256, threads=1, threads_batch=1)
    data = path.read_bytes()
    if kind == "truncated":
        data = data[:len(data) // 2]
    elif kind == "bad measurement":
        d = json.loads(data)
        d["measurements"] = [{"threads": 1}]
        data = json.dumps(d).encode()
    else:
        data = DAMAGED[kind]
    path.write_bytes(data)

    assert tuning.load_profile(model.sha256) is None
    assert tuning.list_profiles() == []
    with edgeinfer.load(NAME) as engine:
        assert engine.threads_source == "default"
        assert engine.threads == hardware.default_threads()


@pytest.mark.parametrize("threads", ["two", -3])
def test_a_profile_with_impossible_thread_counts_is_ignored(model, threads):
    _, path = save(model.sha256, threads=1, threads_batch=1)
    d = json.loads(path.read_text())
    d["threads"] = threads
    path.write_text(json.dumps(d))
    with edgeinfer.load(NAME) as engine:
        assert engine.threads_source == "default"
        assert engine.threads == hardware.default_threads()


# -- edgeinfer tune / bench / doctor -------------------------------------------------------

def test_tune_then_bench_uses_the_tuned_threads(model):
    tuned = invoke("tune", NAME, "--reps", 1, "--pp", 32, "--tg", 8, "--json")
    assert tuned.exit_code == 0, tuned.output
    profile = json.loads(tuned.stdout)
    assert profile["sha256"] == model.sha256 and profile["fingerprint"] == hardware.fingerprint()
    assert [m["threads"] for m in profile["measurements"]] == tuning.candidates()
    assert all(m["prefill_tps"] > 0 and m["decode_tps"] > 0 for m in profile["measurements"])
    assert set(profile["gaps"]) == {"decode_tps", "prefill_tps"}
    assert tuning.load_profile(model.sha256).threads == profile["threads"]

    bench = invoke("bench", NAME, "--reps", 1, "--pp", 32, "--tg", 8, "--json")
    assert bench.exit_code == 0, bench.output
    result = json.loads(bench.stdout)
    assert result["threads_source"] == "tuned"
    assert (result["threads"], result["threads_batch"]) == (profile["threads"], profile["threads_batch"])
    assert [t["test"] for t in result["tests"]] == ["pp32", "tg8"]
    assert all(t["tps"] > 0 for t in result["tests"]) and result["ttft_s"] > 0

    text = invoke("bench", NAME, "--reps", 1, "--pp", 32, "--tg", 8)
    assert text.exit_code == 0, text.output
    assert f"{profile['threads']}/{profile['threads_batch']} (tuned)" in text.stdout
    assert "threads from tuned" in text.stdout


def test_bench_threads_option_wins_over_the_profile(model):
    save(model.sha256, threads=2, threads_batch=2)
    bench = invoke("bench", NAME, "--reps", 1, "--pp", 16, "--tg", 4, "--threads", 1, "--json")
    assert bench.exit_code == 0, bench.output
    result = json.loads(bench.stdout)
    assert (result["threads_source"], result["threads"], result["threads_batch"]) == ("given", 1, 1)


def test_tune_table_and_show(model):
    empty = invoke("tune", "--show")
    assert empty.exit_code == 0 and "No profiles yet" in empty.stdout

    tuned = invoke("tune", NAME, "--reps", 1, "--pp", 16, "--tg", 4)
    assert tuned.exit_code == 0, tuned.output
    profile = tuning.load_profile(model.sha256)
    assert "decode choice" in tuned.stdout and "prefill choice" in tuned.stdout
    assert f"Saved: threads {profile.threads}, threads_batch {profile.threads_batch}" in tuned.stdout

    shown = invoke("tune", "--show")
    assert shown.exit_code == 0
    [line] = shown.stdout.strip().splitlines()
    assert line.startswith(f"{NAME}  threads {profile.threads}  threads_batch {profile.threads_batch}")
    assert f"machine {hardware.fingerprint()} (this one)" in line
    shown_json = json.loads(invoke("tune", "--show", "--json").stdout)
    assert [(p["sha256"], p["threads"]) for p in shown_json] == [(model.sha256, profile.threads)]


def test_tune_of_a_bare_file_says_to_import_it(tiny_model):
    result = invoke("tune", str(tiny_model), "--reps", 1, "--pp", 16, "--tg", 4)
    assert result.exit_code == 1
    assert "edgeinfer import" in result.stderr and "Traceback" not in result.output
    assert tuning.list_profiles() == []


DOCTOR_KEYS = {"cpu_model", "logical_cpus", "physical_cores", "affinity", "cgroup_cpu_quota", "clusters",
               "big_little", "total_memory", "available_memory", "cgroup_memory_limit",
               "cpu_temperature_c", "default_threads", "fingerprint", "profiles", "native", "throttling",
               "board", "arm_cores", "defaults", "load", "rpc"}


def test_doctor(model):
    result = invoke("doctor", "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert set(d) == DOCTOR_KEYS
    assert d["default_threads"] == hardware.default_threads()
    # What a load would use: the engine's settings, resolved for this machine.
    assert d["load"]["n_ctx"] == d["defaults"]["n_ctx"] and d["load"]["threads_source"].startswith("default")
    assert d["fingerprint"] == hardware.fingerprint()
    assert d["affinity"] == hardware.affinity_cpus()
    assert d["profiles"] == []

    save(model.sha256, threads=1, threads_batch=2)
    d = json.loads(invoke("doctor", "--json").stdout)
    assert d["profiles"] == [{"model": NAME, "threads": 1, "threads_batch": 2}]

    text = invoke("doctor")
    assert text.exit_code == 0, text.output
    assert f"{NAME}: 1/2" in text.stdout
    assert f"default threads  {hardware.default_threads()}" in text.stdout


def test_a_busy_box_caps_the_default_threads_but_not_given_ones(tiny_model, monkeypatch):
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    monkeypatch.setattr(hardware, "default_threads", lambda: 2)
    monkeypatch.setattr(hardware, "busy_cores", lambda sample=0.25: 1.0)
    with Engine(tiny_model, prompt_cache=False) as engine:
        assert (engine.threads, engine.threads_batch) == (1, 1)
        assert engine.threads_source == "default, capped at 1: 1.0 cores busy with other work"
    with Engine(tiny_model, prompt_cache=False, threads=2) as engine:
        assert engine.threads == 2 and engine.threads_source == "given"
