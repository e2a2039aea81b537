"""Build a tiny llama-architecture GGUF model for edgeinfer's tests.

The model has random weights, so its output is gibberish, but everything
around the weights is real: a byte-level BPE vocabulary (GPT-2 byte mapping,
merges learned here from the paragraphs below), ChatML control tokens, a
ChatML chat template, an 8192-token training context and tensor rows whose
lengths are multiples of 256, so llama.cpp's quantizer can turn the file into
K-quants and legacy quants. Building takes well under a second, and the same
seed always gives a byte-identical file.

    python scripts/build_tiny_model.py tiny.gguf [--seed N]

Tests import `build(path, seed=...)` directly.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import tempfile

import gguf
import numpy as np

N_EMBD = 256
N_FF = 512
N_HEAD = 4
N_HEAD_KV = 2  # grouped-query attention: two query heads share a KV head
HEAD_DIM = N_EMBD // N_HEAD
N_LAYER = 2
N_CTX_TRAIN = 8192
VOCAB_SIZE = 640
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Fill-in-the-middle tokens per family (build(fim=...)): Qwen2.5-Coder's,
# named in the GGUF's metadata, with its repository tokens; and DeepSeek
# Coder's, which llama.cpp finds by their text alone, with none.
FIM_FAMILIES = {
    "qwen": {"pre": "<|fim_prefix|>", "suf": "<|fim_suffix|>", "mid": "<|fim_middle|>", "pad": "<|fim_pad|>",
             "rep": "<|repo_name|>", "sep": "<|file_sep|>"},
    "deepseek": {"pre": "<｜fim▁begin｜>", "suf": "<｜fim▁hole｜>", "mid": "<｜fim▁end｜>"},
}
FIM_TOKENS = FIM_FAMILIES["qwen"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the BPE merges. Written for this project; its only job is
# to give common English words and word pieces their own tokens.
CORPUS = """\
A small computer on a desk can run a language model if the model is small
enough and the program that runs it is careful with memory. The program reads
the weights from a single file, maps them into memory, and then turns each
prompt into tokens. Every token is a number, and every number stands for a
piece of text: a whole word, the start of a word, a space and a few letters,
or a single byte when nothing longer fits.

When a person types a question, the runtime first looks at the tokens it has
already seen. If the start of the new prompt matches a prompt from before, the
saved state is used again and only the new part has to be read. That makes a
long conversation feel quick, even on a machine with four slow cores and a
little fan that turns on when the work gets hard.

Quantization makes the weights smaller. Instead of storing each weight as a
sixteen bit number, the quantizer stores blocks of weights with a shared scale
and a few bits for each value. The model gets a little worse, but it also gets
three or four times smaller, and on most computers it runs faster too, because
reading memory is often slower than doing the arithmetic.

There are many ways to reach the model: a chat in the terminal, a call from a
Python program, or a message over a socket from another process. All of them
share the same engine, which reads the prompt, writes new tokens one at a time
and stops when the model says it is done, when the limit is reached, or when
the user presses a key to cancel. The engine reports how many tokens it read
and wrote, and how long each part took, so people can compare one machine with
another and pick the number of threads that works best for them.

The weather was mild in the morning. We walked to the market, bought bread,
apples and cheese, and talked about the garden, the river, the old bridge and
the new school that will open next year. In the evening the children read
their books while the rain fell on the roof.
"""

# The GPT-2 pre-tokenizer split, with \p{L} and \p{N} written for Python's re.
_PRETOKENIZE = re.compile(
    r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from byte values to printable characters.

    Printable Latin-1 bytes stand for themselves; the others (controls, space,
    some Latin-1 punctuation) are shifted to code points from 256 upward, so
    that no token text contains whitespace or control characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def train_bpe(text: str, n_tokens: int) -> tuple[list[str], list[str]]:
    """Learn merges until the vocabulary has `n_tokens` entries.

    Returns (tokens, merges). The first 256 tokens are the single bytes, in
    byte order. Ties between equally frequent pairs go to the smallest pair,
    so the result depends only on `text`.
    """
    byte_map = bytes_to_unicode()
    tokens = [byte_map[b] for b in range(256)]
    known = set(tokens)
    merges: list[str] = []

    word_counts = collections.Counter(_PRETOKENIZE.findall(text))
    words = [
        ([byte_map[b] for b in word.encode("utf-8")], count)
        for word, count in sorted(word_counts.items())
    ]
    while len(tokens) < n_tokens:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            raise ValueError("training text too short for the requested vocabulary")
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        if merged not in known:  # (a, bc) and (ab, c) can both make "abc"
            known.add(merged)
            tokens.append(merged)
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    symbols[i : i + 2] = [merged]
                i += 1
    return tokens, merges


def _add_vocab(writer: gguf.GGUFWriter, fim: str | None = None) -> None:
    family = FIM_FAMILIES[fim] if fim else {}
    specials = SPECIAL_TOKENS + tuple(family.values())
    tokens, merges = train_bpe(CORPUS, VOCAB_SIZE - len(specials))
    types = [gguf.TokenType.NORMAL] * len(tokens)
    ids = {}
    for text in specials:
        ids[text] = len(tokens)
        tokens.append(text)
        types.append(gguf.TokenType.CONTROL)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["<|endoftext|>"])
    writer.add_eos_token_id(ids["<|im_end|>"])
    writer.add_eot_token_id(ids["<|im_end|>"])
    writer.add_pad_token_id(ids["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    if fim == "qwen":   # the other family's are found by their text
        for role, text in family.items():
            writer.add_uint32(getattr(gguf.Keys.Tokenizer, f"FIM_{role.upper()}_ID"), ids[text])


def _add_tensors(writer: gguf.GGUFWriter, seed: int) -> None:
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        # numpy shape (rows, cols) is GGUF shape [cols, rows]: each of the
        # `rows` rows has `cols` weights, and cols is what quantizers block.
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(N_EMBD, dtype=np.float32)

    def name(kind: gguf.MODEL_TENSOR, bid: int = 0) -> str:
        return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"

    t = gguf.MODEL_TENSOR
    writer.add_tensor(name(t.TOKEN_EMBD), matrix(VOCAB_SIZE, N_EMBD))
    for bid in range(N_LAYER):
        layer = {
            t.ATTN_NORM: norm(),
            t.ATTN_Q: matrix(N_HEAD * HEAD_DIM, N_EMBD),
            t.ATTN_K: matrix(N_HEAD_KV * HEAD_DIM, N_EMBD),
            t.ATTN_V: matrix(N_HEAD_KV * HEAD_DIM, N_EMBD),
            t.ATTN_OUT: matrix(N_EMBD, N_HEAD * HEAD_DIM),
            t.FFN_NORM: norm(),
            t.FFN_GATE: matrix(N_FF, N_EMBD),
            t.FFN_UP: matrix(N_FF, N_EMBD),
            t.FFN_DOWN: matrix(N_EMBD, N_FF),
        }
        for kind, data in layer.items():
            writer.add_tensor(name(kind, bid), data)
    writer.add_tensor(name(t.OUTPUT_NORM), norm())
    writer.add_tensor(name(t.OUTPUT), matrix(VOCAB_SIZE, N_EMBD))


def build(path: str | os.PathLike[str], *, seed: int = 0, fim: bool | str = False) -> pathlib.Path:
    """Write the tiny model to `path` and return it as a Path; `fim`: with
    a family's fill-in-the-middle tokens (True: Qwen2.5-Coder's; or a key
    of FIM_FAMILIES), another vocabulary, so other output than the
    default model's.

    The file is written beside `path` under a temporary name and renamed into
    place, so a reader never sees a half-written model.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name("edgeinfer-tiny")
        writer.add_license("Apache-2.0")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_vocab_size(VOCAB_SIZE)
        writer.add_context_length(N_CTX_TRAIN)
        writer.add_embedding_length(N_EMBD)
        writer.add_feed_forward_length(N_FF)
        writer.add_block_count(N_LAYER)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_dimension_count(HEAD_DIM)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        _add_vocab(writer, "qwen" if fim is True else fim or None)
        _add_tensors(writer, seed)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the .gguf file")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--fim", nargs="?", const="qwen", choices=sorted(FIM_FAMILIES),
                        help="with a family's fill-in-the-middle tokens (default qwen)")
    args = parser.parse_args(argv)
    out = build(args.out, seed=args.seed, fim=args.fim)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
