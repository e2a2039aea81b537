"""One model in a process of its own, for the server that started it
(edgeinfer.pool): ``python -m edgeinfer.server.worker MODEL --socket PATH``.

It loads the model, prints one JSON line on stdout (the engine's facts,
or why the load failed) and answers JSON lines on the Unix socket,
including the internal ops ("run", "threads"; protocol.INTERNAL_OPS).
It stops on SIGTERM, and when the server that started it dies.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies, so a killed
    server leaves no model processes behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def facts(engine) -> dict:
    """What the server needs to know of a loaded engine."""
    return {"ready": True, "name": engine.name, "n_ctx": engine.n_ctx, "n_seq_max": engine.n_seq_max,
            "n_vocab": engine.n_vocab, "native": engine.native.setting, "threads": engine.threads,
            "pid": os.getpid()}


async def _serve(engine, socket_path: str) -> None:
    from .jsonl import Options, Server, stop_event

    # The socket's directory belongs to the server's user alone (mode 700).
    # Lines come from the server alone, which checked each request's size
    # against its own limits already (a JSON-escaped body grows a little).
    server = Server(engine, Options(host=None, unix=socket_path, internal=True, idle_timeout=1e9,
                                    max_line=1 << 28))
    stop = stop_event()
    await server.start()
    _say(facts(engine))
    # Nothing more goes to the server on stdout: anything printed later
    # goes to the log, and can never fill a pipe nobody reads.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgeinfer-worker")
    p.add_argument("model")
    p.add_argument("--socket", required=True)
    p.add_argument("--options", default="{}", help="edgeinfer.load() keyword arguments, as JSON")
    args = p.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [{args.model}] %(message)s",
                        stream=sys.stderr)
    import edgeinfer

    from ..errors import EdgeinferError

    try:
        engine = edgeinfer.load(args.model, **json.loads(args.options))
    except EdgeinferError as e:
        _say({"ready": False, "class": type(e).__name__, "message": str(e), "hint": e.hint})
        return 1
    except Exception as e:   # noqa: BLE001 - whatever it was, the server must hear why
        _say({"ready": False, "class": "EngineError", "message": f"{type(e).__name__}: {e}", "hint": ""})
        return 1
    if not engine.embedding:
        try:   # the chat template compiles on first use: about 5 ms, better spent before the first request
            engine.chat_tokens([{"role": "user", "content": "Hi"}])
        except EdgeinferError:
            pass   # a template that fails says so to the request that uses it
    try:
        asyncio.run(_serve(engine, args.socket))
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
