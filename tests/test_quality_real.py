"""The first answer is worth reading: the model chosen for this machine,
at its default settings, pulled through the model manager, answers simple
questions right and stops by itself."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import load_script

import edgeinfer
from edgeinfer import model_choice
from edgeinfer.cli import cli

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def chosen(qwen_store, real_model_home):
    """The default model for this machine, in the real store."""
    from edgeinfer.pull import pull

    choice = model_choice.choose()
    pull(choice.entry.ref, store=qwen_store, quiet=True)  # already there when it is one of the pair
    return choice


def test_the_default_model_answers_paris_in_9_of_10_seeds(chosen):
    with edgeinfer.load(chosen.entry.ref) as engine:
        runs = []
        for seed in range(10):
            events = list(engine.stream_chat(QUESTION, seed=seed, max_tokens=256))
            runs.append(("".join(e.text for e in events), events[-1].stats.finish_reason))
    right = [t for t, finish in runs if "paris" in t.lower() and finish == "stop"]
    assert len(right) >= 9, (chosen.line(), runs)


def test_the_default_model_keeps_its_quality_floor(chosen):
    probe = load_script("quality_probe")
    with edgeinfer.load(chosen.entry.ref) as engine:
        r = probe.probe(engine, {}, probe.QUESTIONS[:6], seeds=1, max_tokens=200)
    c = r["counts"]
    assert c["right"] >= 5 and c["ran to max_tokens"] == 0 and c["repetition"] == 0, \
        (chosen.line(), [(a["question"], a["verdict"], a["answer"][:80]) for a in r["answers"]])


def test_run_without_a_model_uses_the_choice(chosen):
    result = CliRunner().invoke(cli, ["run", "What is the capital of France?", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
