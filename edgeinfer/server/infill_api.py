"""``POST /infill``: code completion as llama-server answers it, for the
editors that speak it (llama.vscode, llama.vim).

The request's parts go into the one request model: ``input_prefix`` is
the code before the cursor's line, ``prompt`` the cursor's line up to the
cursor (it continues), ``input_suffix`` the code after the cursor, and
``input_extra`` other files' chunks. ``n_indent``, ``t_max_predict_ms``
and ``n_predict`` shape the answer (edgeinfer.fim.EditorFit);
``samplers`` chooses which of llama.cpp's samplers run, their order
fixed as this server's chain has it; ``response_fields`` picks what the
answer holds. A field llama-server knows and this server does not honour
(``mirostat``, ``n_probs``, ``id_slot``...) is a 400 that names it.

Every fill-in-the-middle request (here and ``suffix`` on
``/v1/completions``) goes through :class:`Editors`: a newer request from
the same editor ends the one it still has running, since the user typed
past it. ``t_max_prompt_ms`` answers empty when the prompt takes longer
to read, and the prompt is still read to the end, so the next keystroke
finds it in the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from dataclasses import dataclass, field

from starlette.responses import JSONResponse, StreamingResponse

from ..events import DoneEvent
from ..fim import check_extra
from ..sampling import check_value
from .api import SSE_HEADERS, Generation, sse, stream_events
from .fields import Fields
from .generation import GenerationRequest, RequestError, keep_alive_of

ENDPOINT = "/infill"
SUPERSEDED_WAIT_S = 5.0   # at most this long for the request a newer one ended to let go of its slot

# The samplers a request may name, in the order this server's chain
# applies them, and what leaving each out means (edgeinfer.sampling).
SAMPLERS = {
    "penalties": {"repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
    "dry": {"dry_multiplier": 0.0},
    "top_k": {"top_k": 0},
    "top_p": {"top_p": 1.0},
    "min_p": {"min_p": 0.0},
    "infill": {"infill": 0},
    "temperature": {"temperature": 1.0},
}
# llama-server's fields for what this server does not do, with the value
# that means "off" (anything else is refused by name).
REFUSED = {
    "mirostat": ((0,), "mirostat sampling is not supported"),
    "typical_p": ((1, 1.0), "typical sampling is not supported"),
    "xtc_probability": ((0, 0.0), "XTC sampling is not supported"),
    "top_n_sigma": ((-1, -1.0, 0, 0.0), "top-n-sigma sampling is not supported"),
    "dynatemp_range": ((0, 0.0), "dynamic temperature is not supported"),
    "n_probs": ((0,), "token probabilities are not given by /infill; use /v1/completions with logprobs"),
    "post_sampling_probs": ((False,), "token probabilities are not given by /infill"),
    "id_slot": ((-1,), "this server chooses the sequence itself"),
    "n_keep": ((0, -1), "the prompt is never shifted out of the context here"),
    "n_cmpl": ((1,), "one answer per request"),
    "lora": (([],), "adapters are not supported"),
    "return_tokens": ((False,), "token ids are not given by /infill"),
    "timings_per_token": ((False,), "timings come with the last chunk only"),
    "image_data": (([],), "images are not supported"),
    "multimodal_data": (([],), "images and audio are not supported"),
}


@dataclass
class _Turn:
    """An editor's request that is running."""

    run: object = None                 # its generation.Run, once started
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    superseded: bool = False


class Editors:
    """The fill-in-the-middle request each editor has running. A newer one
    from the same editor (the user kept typing) ends it at once: it stops
    between steps (a prompt still being read is read to the end and kept
    in the cache, since the newer prompt shares most of it), then the newer
    one starts in the slot it left."""

    def __init__(self):
        self._turns: dict = {}

    async def start(self, front, req: GenerationRequest, body: dict, key, endpoint: str = ENDPOINT, *,
                    prompt_s: float | None = None) -> Generation | None:
        """``req`` started on the model ``body`` names, as ``key``'s turn
        (None: no turn, as for a request that only warms the cache). None
        instead when a newer request from the same editor came before this
        one started, or (with ``prompt_s``) when its first token has not
        come that many seconds after the call: then the prompt goes on
        being read to the end, for the cache, and the request ends."""
        t0 = time.monotonic()
        turn = None
        if key is not None:
            for k in [k for k, t in self._turns.items() if t.ended.is_set()]:
                del self._turns[k]
            old = self._turns.get(key)
            turn = self._turns[key] = _Turn()
            if old is not None:
                old.superseded = True
                if old.run is not None and old.run.wind_down is not None:
                    old.run.wind_down()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(old.ended.wait(), SUPERSEDED_WAIT_S)
            if turn.superseded:   # typed past while it waited: it never starts
                turn.ended.set()
                return None
        try:
            run = await front.require_pool().run(body.get("model"), req, keep_alive=keep_alive_of(body))
        except BaseException:
            if turn is not None:
                turn.ended.set()
            raise
        if turn is not None:
            turn.run = run
            run.events = _marking_end(run.events, turn.ended)
            if turn.superseded and run.wind_down is not None:   # a newer one came while this one started
                run.wind_down()
        first = asyncio.ensure_future(run.events.__anext__())
        left = None if prompt_s is None else max(0.0, prompt_s - (time.monotonic() - t0))
        try:
            await asyncio.wait({first}, timeout=left)
        except BaseException:
            first.cancel()
            await run.aclose()
            raise
        if not first.done():   # too slow for the editor: answer nothing, keep reading the prompt
            if run.wind_down is not None:
                run.wind_down()
            first.add_done_callback(lambda _: asyncio.ensure_future(run.aclose()))
            return None
        try:
            ev = first.result()
        except BaseException:
            await run.aclose()
            raise
        return Generation(run, ev, endpoint, front.metrics)


async def _marking_end(events, ended: asyncio.Event):
    try:
        async for ev in events:
            yield ev
    finally:
        with contextlib.suppress(BaseException):
            await events.aclose()
        ended.set()


def editor_key(endpoint: str, request, body: dict) -> tuple:
    """Who is asking, for :class:`Editors`: the request's ``user`` where
    it gives one (OpenAI's field), else its address, program and
    credentials; with the model it asks for."""
    user = body.get("user")
    if isinstance(user, str) and user:
        who = ("user", user)
    else:
        auth = request.headers.get("authorization", "") + request.headers.get("x-api-key", "")
        who = (request.client.host if request.client else "", request.headers.get("user-agent", ""),
               hashlib.sha256(auth.encode()).hexdigest()[:16])
    return endpoint, body.get("model") or "", who


# llama-server's sampling fields, by the sampling option each sets
# (edgeinfer.sampling checks the value against the option's range).
SAMPLING_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                   "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
                   "penalty_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty", "dry_multiplier": "dry_multiplier",
                   "dry_base": "dry_base", "dry_allowed_length": "dry_allowed_length",
                   "dry_penalty_last_n": "dry_last_n"}


def _sampling(f: Fields) -> dict:
    out = {}
    for name, ours in SAMPLING_FIELDS.items():
        v = f.body.get(name)
        if v is None:
            continue
        if name == "top_k" and v == -1:   # llama-server's "off"
            v = 0
        try:
            out[ours] = check_value(ours, v)
        except RequestError as e:   # named as the request names it
            raise RequestError(name, str(e).replace(ours, name, 1)) from None
    samplers = f.body.get("samplers")
    if samplers is None:
        return out
    if isinstance(samplers, str):   # llama-server also takes them as a string of letters; names only here
        raise f.bad("samplers", "give a list of names, such as [\"top_k\", \"top_p\", \"infill\"]")
    order = list(SAMPLERS)
    if not isinstance(samplers, list) or not all(isinstance(s, str) for s in samplers):
        raise f.bad("samplers", "must be a list of sampler names")
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise f.bad("samplers", f"{unknown[0][:40]!r} is not supported; this server has {', '.join(order)}")
    if [s for s in order if s in samplers] != samplers:
        raise f.bad("samplers", f"this server applies samplers in the order {', '.join(order)}; "
                                "list them in that order")
    for name, neutral in SAMPLERS.items():
        if name not in samplers:
            out.update(neutral)
    if "infill" in samplers:
        out["infill"] = 1
    return out


def parse(body: dict) -> tuple[GenerationRequest, dict]:
    """The request, and what only this face reads: stream, n_predict,
    t_max_prompt_ms (seconds or None), response_fields."""
    f = Fields(body)
    for name, (allowed, why) in REFUSED.items():
        f.refuse(name, allowed, f"{why} (leave {name} out)")
    f.refuse("cache_prompt", (True,), "the prompt cache is always used here, and never changes an answer")
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise f.bad("prompt", "must be a string: the cursor's line up to the cursor (token ids are not taken)")
    n_predict = f.integer("n_predict", -1, 1 << 31)
    fit = {}
    indent = f.integer("n_indent", 0, 1 << 16)
    if indent:
        fit["indent"] = indent
    predict_ms = f.integer("t_max_predict_ms", -1, 1 << 31)
    if predict_ms and predict_ms > 0:
        fit["time_limit"] = predict_ms / 1000
    prompt_ms = f.integer("t_max_prompt_ms", -1, 1 << 31)
    lb = body.get("logit_bias")
    if isinstance(lb, list):   # llama-server's [[token id, bias], ...]
        if not all(isinstance(p, list) and len(p) == 2 for p in lb):
            raise f.bad("logit_bias", "must be an object of token ids to biases, or a list of [token id, bias]")
        lb = {p[0]: (-100 if p[1] is False else p[1]) for p in lb}
    elif lb is not None and not isinstance(lb, dict):
        raise f.bad("logit_bias", "must be an object of token ids to biases")
    req = GenerationRequest(
        prompt=f.string("input_prefix", ""), suffix=f.string("input_suffix", ""),
        fim_extra=check_extra(body.get("input_extra")), fim_middle=prompt, fit=fit,
        max_tokens=None if n_predict is None or n_predict < 0 else n_predict,
        stop=f.stops("stop"), seed=None if body.get("seed") == -1 else f.seed(),   # -1: llama-server's "any"
        sampling=_sampling(f), ignore_eos=f.boolean("ignore_eos"),
        logit_bias=lb or None)
    schema, grammar = body.get("json_schema"), body.get("grammar")
    if schema is not None and grammar is not None:
        raise f.bad("grammar", "give json_schema or grammar, not both")
    if schema is not None:
        if not isinstance(schema, (dict, str)):
            raise f.bad("json_schema", "must be a JSON schema")
        req.json_schema = schema
    req.grammar = f.string("grammar")
    fields = body.get("response_fields")
    if fields is not None and (not isinstance(fields, list) or not all(isinstance(p, str) for p in fields)):
        raise f.bad("response_fields", 'must be a list of field paths, such as ["content", "timings/prompt_n"]')
    return req, {"stream": f.boolean("stream"), "n_predict": n_predict,
                 "prompt_s": prompt_ms / 1000 if prompt_ms and prompt_ms > 0 else None, "fields": fields}


STOP_TYPES = {"stop": "eos", "length": "limit", "repetition": "limit", "cancelled": "none"}


def answer(model_name: str, content: str, stats, *, stop: bool = True) -> dict:
    """One object of llama-server's shape: a streamed piece (``stop``
    False) or the whole answer with its figures."""
    out = {"index": 0, "content": content, "tokens": [], "stop": stop, "id_slot": -1, "model": model_name}
    if not stop:
        return out
    st = stats
    reason = st.finish_reason if st is not None else "cancelled"
    n_prompt, n_cached, n_gen = (st.prompt_tokens, st.cached_tokens, st.generated_tokens) if st else (0, 0, 0)
    prompt_ms = 1000 * st.ttft_s if st else 0.0
    predicted_ms = 1000 * max(0.0, st.total_s - st.ttft_s) if st else 0.0
    read = n_prompt - n_cached
    out.update({
        "tokens_predicted": n_gen, "tokens_evaluated": n_prompt, "tokens_cached": n_prompt + n_gen,
        "truncated": False, "has_new_line": "\n" in content,
        "stop_type": "word" if st is not None and st.stop_sequence else STOP_TYPES.get(reason, "eos"),
        "stopping_word": (st.stop_sequence or "") if st else "",
        "timings": {"cache_n": n_cached, "prompt_n": read, "prompt_ms": prompt_ms,
                    "prompt_per_token_ms": prompt_ms / read if read else 0.0,
                    "prompt_per_second": 1000 * read / prompt_ms if prompt_ms and read else 0.0,
                    "predicted_n": n_gen, "predicted_ms": predicted_ms,
                    "predicted_per_token_ms": predicted_ms / n_gen if n_gen else 0.0,
                    "predicted_per_second": 1000 * n_gen / predicted_ms if predicted_ms and n_gen else 0.0}})
    return out


def picked(obj: dict, paths: list[str] | None) -> dict:
    """``obj`` cut to ``paths`` as llama-server's response_fields does:
    each path ("timings/prompt_n") that exists, as a flat key."""
    if paths is None:
        return obj
    out = {}
    for path in paths:
        v = obj
        for part in path.split("/"):
            if not isinstance(v, dict) or part not in v:
                break
            v = v[part]
        else:
            out[path] = v
    return out


async def infill(front, body: dict, request):
    model = body.get("model")
    if isinstance(model, str) and not model.strip():   # editors send " " for "whatever runs"
        body = {**body, "model": None}
    front.check_model(body.get("model"))
    req, opts = parse(body)
    warm = opts["n_predict"] == 0   # an editor sending other files' chunks ahead: read the prompt only
    key = None if warm else editor_key(ENDPOINT, request, body)
    gen = await front.editors.start(front, req, body, key, prompt_s=None if warm else opts["prompt_s"])
    fields = opts["fields"]
    name = gen.model.name if gen is not None else (body.get("model") or "")
    if gen is None:   # typed past already, or the prompt took longer than t_max_prompt_ms
        empty = picked(answer(name, "", None), fields)
        if not opts["stream"]:
            return JSONResponse(empty)
        return StreamingResponse(iter([sse(empty)]), media_type="text/event-stream", headers=SSE_HEADERS)
    if not opts["stream"]:
        reply = await gen.reply(request)
        return JSONResponse(picked(answer(name, "" if warm else reply.content, gen.stats), fields))

    async def body_iter():
        async for ev in stream_events(gen, front, ENDPOINT):
            if isinstance(ev, bytes):
                yield ev
            elif isinstance(ev, DoneEvent):
                yield sse(picked(answer(name, "", ev.stats), fields))
            elif ev.text and not warm:
                yield sse(picked(answer(name, ev.text, None, stop=False), fields))

    return StreamingResponse(body_iter(), media_type="text/event-stream", headers=SSE_HEADERS)

