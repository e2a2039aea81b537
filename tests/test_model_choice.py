"""The default model is chosen for the machine: from faked memory and speed
figures here; the real choice on this machine is in the real-model tier."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import edgeinfer
from edgeinfer import catalog, model_choice, paths
from edgeinfer.cli import cli
from edgeinfer.errors import CatalogError, ModelNotFoundError

GB = 10**9
SMALL = "smollm2-135m-instruct:q4_1"
MID, BIG = "qwen2.5-coder-0.5b-instruct:q4_k_m", "qwen2.5-coder-1.5b-instruct:q4_k_m"


def entries():
    return catalog.load_catalog()


def test_the_shipped_catalog_ranks_bigger_models_higher():
    e = entries()
    assert e[BIG].quality > e[MID].quality > e[SMALL].quality > 0
    assert catalog.default_entry().ref == SMALL  # the floor
    assert all(e[r].memory > e[r].size for r in (SMALL, MID, BIG))


@pytest.mark.parametrize("available, bandwidth, expected", [
    (32 * GB, 20e9, BIG),       # a laptop: room and speed for the best
    (1.5 * GB, 20e9, MID),      # the 1.5B needs about 2.3 GB with its margin
    (0.6 * GB, 20e9, SMALL),    # a 1 GB board with little free
    (32 * GB, 12e9, BIG),       # the 1.5B at about 8.6 tok/s: just fast enough ...
    (32 * GB, 10e9, MID),       # ... and here at 7.2 tok/s: too slow
    (32 * GB, 4e9, SMALL),      # a Pi 4's memory: even the 0.5B would crawl
])
def test_the_choice_follows_memory_and_speed(available, bandwidth, expected):
    choice = model_choice.choose(available=int(available), bandwidth=bandwidth)
    assert choice.entry.ref == expected, (choice.reason, choice.passed_over)
    assert choice.reason
    if expected != BIG:
        assert BIG in dict(choice.passed_over)


def test_the_reason_names_what_was_passed_over():
    choice = model_choice.choose(available=int(1.5 * GB), bandwidth=20e9)
    why = dict(choice.passed_over)[BIG]
    assert "GB with a margin" in why and "1.5 GB is available" in why
    choice = model_choice.choose(available=32 * GB, bandwidth=10e9)
    assert "under 8" in dict(choice.passed_over)[BIG]
    assert choice.expected_tps and choice.expected_tps >= model_choice.MIN_DECODE_TPS
    assert "about" in choice.line() and "tok/s" in choice.line()


def test_a_tuned_profile_beats_the_estimate(monkeypatch):
    from edgeinfer import tuning

    big = entries()[BIG]
    profile = tuning.Profile(fingerprint="x", sha256=big.sha256, model=BIG, threads=2, threads_batch=2,
                             default_threads=2, measurements=[tuning.Measurement(2, 100.0, 5.0)])
    monkeypatch.setattr(tuning, "load_profile", lambda sha, fingerprint=None: profile if sha == big.sha256 else None)
    choice = model_choice.choose(available=32 * GB, bandwidth=50e9)  # the estimate alone says ~36 tok/s
    assert choice.entry.ref == MID
    assert "measured by 'edgeinfer tune'" in dict(choice.passed_over)[BIG]


def test_pinned_by_environment_or_config(monkeypatch):
    monkeypatch.setenv(model_choice.ENV, "smollm2-135m-instruct")
    choice = model_choice.choose(available=32 * GB, bandwidth=20e9)
    assert choice.entry.ref == SMALL and choice.pinned and model_choice.ENV in choice.reason
    monkeypatch.delenv(model_choice.ENV)
    cfg = paths.config_dir()
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.toml").write_text('default_model = "qwen2.5-coder-0.5b-instruct"\n')
    assert model_choice.choose(available=32 * GB, bandwidth=20e9).entry.ref == MID
    (cfg / "config.toml").write_text('default_model = "nosuch"\n')
    with pytest.raises(ModelNotFoundError, match="pinned"):
        model_choice.choose()
    (cfg / "config.toml").write_text('default_model = [\n')
    with pytest.raises(CatalogError):
        model_choice.choose()


def test_the_bandwidth_is_measured_once_per_machine():
    first = model_choice.measure_bandwidth()
    assert 1e8 < first < 1e12
    assert model_choice.measure_bandwidth() == first  # remembered, so the choice does not flap


def test_chat_says_which_model_and_why_before_pulling(monkeypatch):
    monkeypatch.setattr(model_choice, "measure_bandwidth", lambda: 20e9)
    monkeypatch.setattr(model_choice.hardware, "available_memory", lambda: 32 * GB)
    r = CliRunner().invoke(cli, ["run", "hello"])  # no --yes, no terminal: it must not pull
    assert r.exit_code == 1
    assert f"Default model for this machine: {BIG} (1.12 GB, about" in r.stderr
    assert "the best catalog model that fits" in r.stderr
    assert f"edgeinfer pull {BIG}" in r.stderr


def test_load_without_a_name_loads_the_choice(monkeypatch, tiny_model):
    monkeypatch.setenv(model_choice.ENV, "smollm2-135m-instruct")
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        edgeinfer.load()  # chosen, but not pulled: the hint says to pull it
