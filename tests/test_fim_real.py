"""Code completion on Qwen2.5-Coder 1.5B, pulled through the model
manager: held-out small functions whose bodies the model writes between
their docstring and the rest of the file, each run against asserts
written here. The answer must fit the file as an editor would insert it:
it ends with the block, and never repeats the suffix.

Measured on a 2-core AMD EPYC (greedy): the 1.5B passes 6 of 6; the 0.5B
passes 3 of 6, which is why docs/editors.md names the 1.5B."""

from __future__ import annotations

import pytest

import edgeinfer

# (code before the body, code after it, asserts the whole file must pass)
HELD_OUT = {
    "gcd": ('import math\n\n\ndef gcd(a: int, b: int) -> int:\n'
            '    """The greatest common divisor of a and b, by Euclid\'s algorithm."""\n',
            "\n\n\ndef lcm(a: int, b: int) -> int:\n    return a * b // gcd(a, b)\n",
            "assert gcd(12, 18) == 6 and gcd(7, 5) == 1 and gcd(0, 9) == 9 and lcm(4, 6) == 12"),
    "vowels": ('def count_vowels(text: str) -> int:\n'
               '    """How many vowels (a, e, i, o, u, either case) text has."""\n',
               '\n\n\nif __name__ == "__main__":\n    print(count_vowels("Hello World"))\n',
               "assert count_vowels('Hello World') == 3 and count_vowels('xyz') == 0 and count_vowels('AEIOU') == 5"),
    "flatten": ('def flatten(rows: list[list[int]]) -> list[int]:\n'
                '    """The items of every row, in order, in one list."""\n',
                "\n\n\ndef total(rows: list[list[int]]) -> int:\n    return sum(flatten(rows))\n",
                "assert flatten([[1, 2], [3], []]) == [1, 2, 3] and total([[1], [2, 3]]) == 6"),
    "palindrome": ('def is_palindrome(text: str) -> bool:\n'
                   '    """Whether text reads the same backwards, ignoring case."""\n',
                   '\n\n\nRESULT = is_palindrome("Level")\n',
                   "assert is_palindrome('Level') and not is_palindrome('abc') and is_palindrome('') and RESULT"),
    "fahrenheit": ('def to_fahrenheit(celsius: float) -> float:\n    """Degrees Celsius in degrees Fahrenheit."""\n',
                   "\n\n\nBOILING = to_fahrenheit(100)\n",
                   "assert to_fahrenheit(100) == 212 and to_fahrenheit(0) == 32 and BOILING == 212"),
    "word_count": ('from collections import Counter\n\n\ndef word_count(text: str) -> dict[str, int]:\n'
                   '    """How often each word of text occurs, words split on white space and lower-cased."""\n',
                   "\n\n\ndef most_common(text: str) -> str:\n    counts = word_count(text)\n"
                   "    return max(counts, key=counts.get)\n",
                   "assert word_count('a b A') == {'a': 2, 'b': 1} and most_common('x y y') == 'y'"),
}


@pytest.fixture(scope="module")
def coder(qwen_store, shared_selftest):
    link = qwen_store.root / "selftest"   # as real_model_home does, for the module
    if not link.exists() and not link.is_symlink():
        link.symlink_to(shared_selftest, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEINFER_HOME", str(qwen_store.root))
        with edgeinfer.load("qwen2.5-coder-1.5b-instruct", n_ctx=2048, threads=2) as e:
            yield e


def test_held_out_function_bodies_run_against_their_asserts(coder):
    passed, failures = 0, []
    for name, (before, after, asserts) in HELD_OUT.items():
        body = coder.infill(before, after, max_tokens=120, temperature=0, dedent=True)
        # The editor's insert: a block that ends before the next definition,
        # and no line of the suffix written again.
        assert not body.endswith("\n") and after.strip().splitlines()[0] not in body, (name, body)
        scope = {"__name__": "held_out"}
        try:
            exec(before + body + after, scope)   # noqa: S102 - the model's code, run as its test
            exec(asserts, scope)                 # noqa: S102
            passed += 1
        except Exception as e:  # noqa: BLE001 - any failure of the model's code counts against it
            failures.append(f"{name}: {type(e).__name__} {e} in {body!r}")
    # Greedy answers can differ on another CPU's arithmetic: one miss is allowed.
    assert passed >= len(HELD_OUT) - 1, failures


def test_typing_at_the_cursor_reuses_the_file_and_keeps_the_answer_sensible(coder):
    before, after, _ = HELD_OUT["gcd"]
    first = list(coder.stream_infill(before, after, max_tokens=24, temperature=0, dedent=True))
    typed = list(coder.stream_infill(before + "    while", after, max_tokens=24, temperature=0, dedent=True))
    st = typed[-1].stats
    assert st.prompt_tokens - st.cached_tokens <= 4, st   # the typed word, and the two always read again
    assert first[-1].stats.finish_reason in ("stop", "length")
    assert "".join(e.text for e in typed[:-1]).lstrip().startswith("b")   # "while b:"
