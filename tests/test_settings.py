"""What a load uses, resolved without llama.cpp or a model: any machine is
a set of arguments."""

from __future__ import annotations

import pytest

from edgeinfer.errors import SpeculativeError
from edgeinfer.fit import BoxProfile
from edgeinfer.settings import resolve

STANDARD = BoxProfile("standard", 4096, 8, "f16", "16 GiB")
ONE_GB = BoxProfile("small", 1024, 1, "q8_0", "1 GiB")
QUIET = dict(cores=4, busy=0.0, usable=4)


def test_a_standard_box_takes_its_defaults_within_the_models_own_context():
    s = resolve(box=STANDARD, train_ctx=2048, **QUIET)
    assert (s.n_ctx, s.kv_type, s.threads, s.threads_batch, s.threads_source) == (2048, "f16", 4, 4, "default")
    assert s.n_seq_max == 4 and s.n_batch == 512 and s.speculative.mode == "auto"
    assert resolve(box=STANDARD, train_ctx=None, **QUIET).n_ctx == 4096


def test_a_one_gigabyte_board_gets_a_short_context_one_sequence_and_a_q8_0_k_cache():
    s = resolve(box=ONE_GB, train_ctx=8192, **QUIET)
    assert (s.n_ctx, s.n_seq_max, s.kv_type, s.n_batch) == (1024, 1, "q8_0", 512)


def test_threads_given_beat_tuned_beat_default():
    assert resolve(box=STANDARD, train_ctx=None, tuned=(3, 4), threads=1, **QUIET).threads_source == "given"
    tuned = resolve(box=STANDARD, train_ctx=None, tuned=(3, 4), **QUIET)
    assert (tuned.threads, tuned.threads_batch, tuned.threads_source) == (3, 4, "tuned")


def test_a_busy_box_caps_chosen_threads_but_not_given_ones():
    s = resolve(box=STANDARD, train_ctx=None, cores=4, busy=2.4, usable=4)
    assert (s.threads, s.threads_batch) == (2, 2) and s.threads_source.startswith("default, capped at 2")
    given = resolve(box=STANDARD, train_ctx=None, cores=4, busy=2.4, usable=4, threads=4)
    assert (given.threads, given.threads_source) == (4, "given")


def test_a_draft_model_means_draft_mode_and_draft_mode_needs_one():
    assert resolve(box=STANDARD, train_ctx=None, has_draft=True, **QUIET).speculative.mode == "draft"
    with pytest.raises(SpeculativeError, match="draft model"):
        resolve(box=STANDARD, train_ctx=None, speculative="draft", **QUIET)
    with pytest.raises(SpeculativeError):
        resolve(box=STANDARD, train_ctx=None, speculative="always", **QUIET)


def test_options_given_are_kept_and_checked():
    s = resolve(box=STANDARD, train_ctx=None, n_ctx=600, n_batch=2048, n_seq_max=3, kv_type="q8_0", **QUIET)
    assert (s.n_ctx, s.n_batch, s.n_seq_max, s.kv_type) == (600, 600, 3, "q8_0")
    with pytest.raises(ValueError, match="kv_type"):
        resolve(box=STANDARD, train_ctx=None, kv_type="q4_0", **QUIET)
    assert resolve(box=STANDARD, train_ctx=None, **QUIET).describe()["sequences"] == 8
