#!/usr/bin/env python
"""Embeddings: retrieval accuracy and throughput, edgeinfer's Engine.embed
beside llama-cpp-python's ``Llama(embedding=True).embed`` on the same GGUF.

* Retrieval: 36 questions, each written for one of 36 short documents on
  different topics; a question is answered right when its document is
  the nearest of all 36 (top-1 accuracy), by cosine similarity.
* Throughput: sentences per second embedding 1, 16 and 128 sentences in
  one call. Each runtime runs in processes of its own (two ggml thread
  teams in one process slow each other), alternating which goes first,
  ``--rounds`` times; the table shows medians and min-max.

    python scripts/bench_embeddings.py                       # all-minilm-l6-v2 from the store
    python scripts/bench_embeddings.py --model all-minilm-l6-v2:q8_0 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

PAIRS = [
    ("How do bees make honey?", "Bees collect nectar from flowers and evaporate it in the hive into honey."),
    ("What causes the tides?", "The pull of the moon's gravity on the oceans raises the tides twice a day."),
    ("How do I bake sourdough bread?", "Sourdough rises with a starter of wild yeast; bake the loaf hot in a "
                                       "covered pot."),
    ("Why is the sky blue?", "Air scatters short blue wavelengths of sunlight more than red ones."),
    ("How does a vaccine protect you?", "A vaccine trains the immune system to recognise a germ before an "
                                        "infection."),
    ("What is the capital of Japan?", "Tokyo is Japan's capital and its largest city."),
    ("How do I change a flat tyre?", "Loosen the wheel nuts, jack up the car, swap in the spare wheel and "
                                     "tighten the nuts."),
    ("What do pandas eat?", "Giant pandas live almost entirely on bamboo shoots and leaves."),
    ("How does compound interest work?", "Interest earned is added to the balance, so later interest is "
                                         "paid on interest too."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa in the early sixteenth century."),
    ("How do solar panels make electricity?", "Photovoltaic cells turn sunlight directly into electric current."),
    ("What is a black hole?", "A black hole is a region where gravity is so strong that not even light escapes."),
    ("How can I sleep better at night?", "Keep a regular bedtime, a dark cool room, and avoid screens late "
                                         "in the evening."),
    ("Why do leaves change colour in autumn?", "As chlorophyll breaks down in autumn, yellow and red pigments "
                                               "show in the leaves."),
    ("How do I reset my router?", "Hold the router's reset button for ten seconds to restore its factory "
                                  "settings."),
    ("What is the boiling point of water?", "At sea level pure water boils at one hundred degrees Celsius."),
    ("How do airplanes stay in the air?", "Wings shaped to deflect air downward produce lift that holds the "
                                          "plane up."),
    ("What is photosynthesis?", "Plants use light to turn carbon dioxide and water into sugar and oxygen."),
    ("How long do cats live?", "House cats usually live twelve to eighteen years."),
    ("How do I learn to play the guitar?", "Start with a few open chords, practise changing between them, "
                                           "and strum simple songs."),
    ("What is inflation?", "Inflation is the general rise of prices, which lowers what money can buy."),
    ("Why do we have seasons?", "The tilt of the Earth's axis changes how directly sunlight strikes each "
                                "hemisphere over the year."),
    ("How is glass made?", "Sand, soda and lime are melted together in a furnace and cooled into glass."),
    ("What is the tallest mountain on Earth?", "Mount Everest, in the Himalayas, rises 8,849 metres above "
                                               "sea level."),
    ("How do I remove a coffee stain?", "Blot the coffee stain, then rinse it with cold water and a little "
                                        "detergent."),
    ("What does DNA do?", "DNA carries the genetic instructions a cell uses to build proteins."),
    ("How fast does light travel?", "Light moves through a vacuum at about 300,000 kilometres per second."),
    ("How do I grow tomatoes?", "Plant tomatoes in full sun, water them deeply, and tie the stems to stakes."),
    ("What is a haiku?", "A haiku is a short Japanese poem of three lines with five, seven and five "
                         "syllables."),
    ("How do earthquakes happen?", "Earthquakes come when stress between tectonic plates is suddenly "
                                   "released along a fault."),
    ("Why is exercise good for the heart?", "Regular exercise strengthens the heart muscle and lowers blood "
                                            "pressure."),
    ("What is the speed of sound?", "Sound travels through air at about 343 metres per second."),
    ("How does a refrigerator keep food cold?", "A fridge pumps a refrigerant that absorbs heat inside and "
                                                "releases it outside."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote the tragedy Romeo and Juliet."),
    ("How do I make a cup of tea?", "Pour boiling water over a tea bag, steep it for three minutes, then "
                                    "add milk if you like."),
    ("What are the planets of the solar system?", "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and "
                                                  "Neptune orbit the Sun."),
]
SIZES = (1, 16, 128)


def sentences(n: int) -> list[str]:
    docs = [d for _, d in PAIRS] + [q for q, _ in PAIRS]
    return [docs[i % len(docs)] for i in range(n)]


def measure(runtime: str, model: str, threads: int, reps: int) -> dict:
    """One runtime in this process: retrieval accuracy, then sentences/s."""
    from edgeinfer.store import resolve_model

    path = str(resolve_model(model)[0])
    if runtime == "edgeinfer":
        import edgeinfer

        engine = edgeinfer.load(model, threads=threads)
        embed = engine.embed
    else:
        import llama_cpp

        from edgeinfer.gguf_file import read_gguf

        n_ctx = read_gguf(path).context_length or 512   # the model's own positions, as the engine uses
        llm = llama_cpp.Llama(path, embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                              n_threads_batch=threads, verbose=False)

        def embed(texts):
            v = np.array(llm.embed(texts), dtype=np.float32)   # Llama.embed does not normalise by default
            return v / np.linalg.norm(v, axis=1, keepdims=True)
    q = embed([q for q, _ in PAIRS])
    d = embed([d for _, d in PAIRS])
    right = int((np.argmax(q @ d.T, axis=1) == np.arange(len(PAIRS))).sum())
    out = {"runtime": runtime, "top1": right / len(PAIRS), "right": right, "n": len(PAIRS), "sps": {}}
    for n in SIZES:
        texts = sentences(n)
        embed(texts)   # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            embed(texts)
            times.append(time.perf_counter() - t0)
        out["sps"][n] = n / statistics.median(times)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed calls per size within a process")
    p.add_argument("--only", choices=("edgeinfer", "Llama"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.model, args.threads, args.reps)))
        return 0
    from edgeinfer.hardware import cpu_model

    runs: dict[str, list[dict]] = {"edgeinfer": [], "Llama": []}
    for r in range(args.rounds):
        order = ("edgeinfer", "Llama") if r % 2 == 0 else ("Llama", "edgeinfer")
        for runtime in order:
            out = subprocess.run([sys.executable, __file__, "--only", runtime, "--model", args.model, "--threads",
                                  str(args.threads), "--reps", str(args.reps)], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            runs[runtime].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"# {args.model}, {cpu_model()}, {args.threads} threads, {args.rounds} rounds x {args.reps} calls; "
          "sentences/s, median (min-max)")
    print("| runtime | top-1 | " + " | ".join(f"{n} at once" for n in SIZES) + " |")
    print("|---|---:|" + "---:|" * len(SIZES))
    for runtime, rs in runs.items():
        cells = []
        for n in SIZES:
            xs = [r["sps"][str(n)] if str(n) in r["sps"] else r["sps"][n] for r in rs]
            cells.append(f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})")
        print(f"| {runtime} | {rs[0]['right']}/{rs[0]['n']} | " + " | ".join(cells) + " |")
    for n in SIZES:
        ratios = [a["sps"][str(n)] / b["sps"][str(n)] for a, b in zip(runs["edgeinfer"], runs["Llama"])]
        print(f"{n} at once: edgeinfer / Llama = {statistics.median(ratios):.3f} (rounds "
              f"{', '.join(f'{x:.3f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
