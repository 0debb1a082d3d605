"""The local server: the explorer page and an OpenAI-compatible completions API.

Everything the model computes here goes through the library that ``sample.py`` uses:
prompts are read by `model.generate.encode_prompt`, completions are the event stream of
`model.generate.generate_events` (the same tokens, text, end rule and seeds as the
CLI), a token's text and glyphs come from the tokenizer (`Tokenizer.token_text`,
`Tokenizer.display`), and the kept sets of the distribution view from
`model.decoding.sampling_distribution` with specs read by `parse_strategy`. The page
(``model/static/explorer.html``) only draws what these endpoints return.

Endpoints:

    GET  /                   the explorer page (one static file; works offline)
    GET  /health             liveness, and how many generations run and wait
    GET  /v1/models          the one model served
    POST /v1/completions     OpenAI's completions schema, streaming as server-sent events
    POST /v1/distribution    next-token candidates of one context, raw and per strategy

Extensions to OpenAI's completions: ``strategy``, a spec such as "top-p:p=0.9" instead of
the sampling fields (the page sends only these), and in each choice's ``logprobs``,
``display_tokens`` and ``top_display``: the tokens as `Tokenizer.display` shows them.
Served speculatively (``serve --draft`` or ``--prompt-lookup``), a choice ends with
``speculation``: its ``proposed`` and ``accepted`` tokens and ``target_passes``.

Every request is validated before any work: a bad one gets a 4xx whose body is one line
of JSON, ``{"error": {"message": ..., "type": ..., "param": <the field>, "code": null}}``;
so does a bug (500), and a stream that fails midway sends that line as its last chunk
before ``data: [DONE]``. Only requests addressed to this host (421) with JSON bodies
(415) are read, which keeps other sites' pages out. At most ``max_concurrent`` requests
use the model at once and at most ``max_waiting`` more wait for a turn; beyond that the
answer is 503 with ``Retry-After``. A stream whose client goes away stops at the next
token (beam search: once the prompt's search ends); a connection that sends no request, or not all of its body, is closed after a
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import json
import logging
import math
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import torch
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from model.decoding import PenaltyState, sampling_distribution
from model.errors import UserError
from model.generate import MAX_SEED, Context, Event, TokenDetail, dry_breakers, encode_prompt, generate_events
from model.score import forced_logprobs
from model.gpt import GPT
from model.speculative import Speculation, speculation_problem
from model.strategy import DecodingSpec, is_number, is_whole, parse_strategy
from model.tokenizer import Tokenizer

PAGE = Path(__file__).parent / "static" / "explorer.html"
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413) before it is parsed
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 20  # alternatives per token; OpenAI allows 5, vLLM 20
MAX_CANDIDATES = 200  # candidates per list in the distribution view
RETRY_AFTER_S = 1
MAX_CONCURRENT = 32  # generations run in anyio's worker threads, of which there are 40
MAX_JSON_DEPTH = 32  # no request field nests deeper than 3; the error messages repr() values, which recurses
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What one server allows. ``max_rows`` bounds prompts x n of one request."""

    model_name: str
    max_tokens: int = 512
    max_concurrent: int = 4
    max_waiting: int = 16
    max_rows: int = 16
    window: str = "exact"
    # Host names a request may be addressed to ("*": any). Only these, so that a web page
    # on another site cannot reach the server by pointing its own name at 127.0.0.1 (DNS
    # rebinding). The port is not checked: a forwarded port (ssh -L 9000:localhost:8000) works.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    # A connection with no complete request line and headers for this long is closed, and a
    # request whose body has not all arrived this long after its headers gets a 408: a
    # client cannot hold a connection (and its memory) forever.
    idle_timeout_s: float = 15.0
    body_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_concurrent", "max_rows"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("idle_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_concurrent > MAX_CONCURRENT:
            raise UserError(f"max_concurrent must be <= {MAX_CONCURRENT}, got {self.max_concurrent}")
        if self.max_waiting < 0:
            raise UserError(f"max_waiting must be >= 0, got {self.max_waiting}")


class RequestError(Exception):
    """A request the server refuses: HTTP status, one-line message, the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.headers = message, param, status, kind, headers

    def body(self) -> str:
        """The one line of JSON that says what went wrong."""
        return json.dumps({"error": {"message": " ".join(self.message.split()), "type": self.kind,
                                     "param": self.param, "code": None}})

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, headers=self.headers, media_type="application/json")


# ----------------------------------------------------------------------------------------
# Requests: JSON in, a checked job out.


@dataclasses.dataclass(frozen=True)
class CompletionJob:
    """A validated completions request."""

    prompts: list[list[int]]  # token ids of each prompt (an empty text prompt is the end-of-text token)
    prompt_texts: list[str]
    spec: DecodingSpec
    max_tokens: int
    n: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    logprobs: int | None
    echo: bool
    include_usage: bool
    return_token_ids: bool

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


# Extension fields for the project's other strategies, named as vLLM names them (top_k,
# min_p, repetition_penalty, eta_cutoff, epsilon_cutoff, as transformers does), as
# text-generation-inference and llama.cpp name typical_p, as llama.cpp names top_n_sigma,
# mirostat*, xtc_* and dry_*, top_h as transformers, and temperature_last (true: the chain
# order temperature-last) as text-generation-webui.
_SPEC_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "top_n_sigma", "top_h", "epsilon_cutoff",
                "eta_cutoff", "xtc_probability", "xtc_threshold", "mirostat", "mirostat_tau", "mirostat_eta",
                "repetition_penalty", "frequency_penalty", "presence_penalty", "dry_multiplier", "dry_base",
                "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "temperature_last")
_WHOLE_SPEC_FIELDS = ("top_k", "mirostat", "dry_allowed_length", "dry_penalty_last_n")
_DRY_FIELDS = ("dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers")
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "n", "stop", "seed", "stream", "stream_options", "logprobs",
                      "echo", "return_token_ids", "user", "best_of", "logit_bias", "suffix", "strategy",
                      *_SPEC_FIELDS}
_DISTRIBUTION_FIELDS = {"model", "prompt", "strategies", "top"}


def _check_json(body: dict) -> None:
    """Refuse a body nested deeper than MAX_JSON_DEPTH, and a string or field name with a
    lone surrogate ("\\ud800" is valid JSON but not text: it has no UTF-8, so it could be
    neither tokenized nor sent back). Walked without recursion: the depth is what is checked."""
    stack: list[tuple[str, object, int]] = [("", body, 1)]
    while stack:
        path, value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                               path.partition("[")[0].partition(".")[0])  # the field, not 32 indices
        if isinstance(value, dict):
            for name, item in value.items():
                field = f"{path}.{name}" if path else name
                if not _is_text(name):
                    shown = field.encode("utf-8", "backslashreplace").decode("utf-8")
                    raise RequestError(f"field name {shown} is not valid Unicode (it has a lone surrogate)", shown)
                stack.append((field, item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item, depth + 1) for index, item in enumerate(value))
        elif isinstance(value, str) and not _is_text(value):
            raise RequestError(f"{path} is not valid Unicode text (it has a lone surrogate)", path)


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_fields(body: dict, known: set[str]) -> None:
    for name in body:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RequestError(f"unknown field '{name}'{hint}", name)


def _whole(body: dict, name: str, default: int | None, low: int, high: int | None = None,
           limit_note: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not is_whole(value) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(f"{name}={value!r} is invalid; it must be a whole number {bound}{limit_note}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name}={value!r} must be true or false", name)
    return value


def read_spec(body: dict) -> DecodingSpec:
    """The DecodingSpec of a request: the extension field ``strategy``, a spec as
    `parse_strategy` reads it ("top-p:p=0.9", as the distribution view takes them), or
    else OpenAI-style sampling fields. Off values as OpenAI, vLLM and llama.cpp clients
    send them (top_p 1, top_k 0 or -1, min_p 0, typical_p 1, eta_cutoff and epsilon_cutoff
    0, top_n_sigma <= 0, and dry_penalty_last_n 0, which turns DRY off) mean no filter;
    a setting at its default is the same as leaving it out (llama.cpp clients send
    mirostat_tau 5 with mirostat 0); temperature 0 is greedy decoding. The two ways are
    not mixed: which would win is anybody's guess."""
    if body.get("strategy") is not None:
        return _read_strategy(body)
    fields: dict[str, Any] = {}
    for name in _SPEC_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if name == "dry_sequence_breakers":
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise RequestError(f"{name} must be a list of strings such as [\"\\n\", \":\"]", name)
            value = tuple(value)
        elif name == "temperature_last":
            if not isinstance(value, bool):
                raise RequestError(f"{name}={value!r} must be true or false", name)
        elif not is_number(value) or not math.isfinite(value):
            raise RequestError(f"{name}={value!r} must be a finite number", name)
        elif name in _WHOLE_SPEC_FIELDS and not is_whole(value):
            off = " (0 or -1: off)" if name == "top_k" else ""
            raise RequestError(f"{name}={value!r} must be a whole number{off}", name)
        fields[name] = value
    if fields.get("top_k") in (0, -1):
        del fields["top_k"]
    for name, off in (("top_p", 1), ("min_p", 0), ("typical_p", 1), ("eta_cutoff", 0), ("epsilon_cutoff", 0)):
        if fields.get(name) == off:
            del fields[name]
    if fields.get("top_n_sigma", 1) <= 0:
        del fields["top_n_sigma"]
    if fields.get("dry_penalty_last_n") == 0:
        for name in _DRY_FIELDS:
            fields.pop(name, None)
    if fields.pop("temperature_last", False):
        fields["order"] = "temperature-last"
    try:
        return DecodingSpec(**fields)
    except UserError as error:
        message = str(error).split(" | ")[0]
        param = message.partition("=")[0]
        raise RequestError(message, param if param in _SPEC_FIELDS else None) from None


def _read_strategy(body: dict) -> DecodingSpec:
    mixed = [name for name in _SPEC_FIELDS if body.get(name) is not None]
    if mixed:
        raise RequestError(f"strategy and {mixed[0]} are two ways to say how to sample; give one of them",
                           "strategy")
    text = body["strategy"]
    if not isinstance(text, str):
        raise RequestError("strategy must be a string such as 'top-p:p=0.9'", "strategy")
    try:
        return parse_strategy(text)
    except UserError as error:
        raise RequestError(f"strategy: {error}", "strategy") from None


def read_prompts(value: object, tokenizer: Tokenizer) -> tuple[list[list[int]], list[str]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of
    lists of token ids. Returns (token ids, text) per prompt, by `encode_prompt`'s rules
    (as sample.py: a prompt longer than the context is read through the window)."""
    if value is None:
        value = ""
    if isinstance(value, str):
        items, kind = [value], "text"
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        items, kind = value, "text"
    elif isinstance(value, list) and value and all(is_whole(v) for v in value):
        items, kind = [value], "ids"
    elif isinstance(value, list) and value and all(isinstance(v, list) and v and all(is_whole(t) for t in v)
                                                    for v in value):
        items, kind = value, "ids"
    else:
        raise RequestError("prompt must be a string, a list of strings, a list of token ids or a list of "
                           "non-empty lists of token ids", "prompt")
    ids, texts = [], []
    for index, item in enumerate(items):
        name = "prompt" if len(items) == 1 else f"prompt[{index}]"
        try:
            ids.append(encode_prompt(tokenizer, item, name))
        except UserError as error:
            raise RequestError(str(error), "prompt") from None
        texts.append(item if kind == "text" else tokenizer.decode(item))
    return ids, texts


def read_stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOP_STRINGS):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    return tuple(stops)


def completion_job(body: dict, settings: ServeSettings, tokenizer: Tokenizer) -> CompletionJob:
    """Check a completions request field by field; the first problem is a RequestError."""
    _check_fields(body, _COMPLETION_FIELDS)
    _check_model(body, settings)
    for name, allowed in (("best_of", (None, 1)), ("suffix", (None, "")), ("logit_bias", (None, {}))):
        if body.get(name) not in allowed:
            raise RequestError(f"{name} is not supported by this server", name)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError("user must be a string", "user")
    prompts, texts = read_prompts(body.get("prompt"), tokenizer)
    max_tokens = _whole(body, "max_tokens", min(16, settings.max_tokens), 0, settings.max_tokens,
                        " (this server's --max-tokens)")
    n = _whole(body, "n", 1, 1, settings.max_rows // len(prompts) or 1)
    if len(prompts) * n > settings.max_rows:
        raise RequestError(f"{len(prompts)} prompts x n={n} is more than this server's {settings.max_rows} "
                           "completions per request", "prompt")
    seed = _whole(body, "seed", None, 0, MAX_SEED - len(prompts) * n + 1)
    if seed is None:
        seed = secrets.randbelow(2**31)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise RequestError("stream_options must be {\"include_usage\": true|false}, with stream true",
                           "stream_options")
    return CompletionJob(
        prompts=prompts, prompt_texts=texts, spec=read_spec(body), max_tokens=max_tokens, n=n, seed=seed,
        stop=read_stop(body.get("stop")), stream=stream, logprobs=_whole(body, "logprobs", None, 0, MAX_LOGPROBS),
        echo=_flag(body, "echo"), include_usage=bool((options or {}).get("include_usage")),
        return_token_ids=_flag(body, "return_token_ids"),
    )


def _check_model(body: dict, settings: ServeSettings) -> None:
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise RequestError(f"model '{model}' is not served here; this server serves '{settings.model_name}'",
                           "model", status=404, kind="not_found_error")


# ----------------------------------------------------------------------------------------
# Generation: the library's event stream, in OpenAI's shape.


def completion_events(model: GPT, tokenizer: Tokenizer, job: CompletionJob, window: str,
                      speculation: Speculation | None = None) -> Iterator[list[Event]]:
    """`generate_events` for a job (rows prompt-major, row r seeded seed + r), or a
    RequestError when generate refuses it (a batch too large for memory). With a
    speculation, the strategies it keeps exact are decoded speculatively (the same
    distribution), the others (beam search) plainly."""
    if speculation is not None and speculation_problem(job.spec, window) is not None:
        speculation = None
    try:
        return generate_events(model, tokenizer, job.prompts, job.spec, max_new_tokens=job.max_tokens,
                               num_samples=job.n, seed=job.seed, stop=job.stop, window=window,
                               top=job.logprobs or 0, speculate=speculation)
    except UserError as error:
        raise RequestError(str(error)) from None


def _top_logprobs(tokenizer: Tokenizer, detail: TokenDetail | None) -> dict[str, float] | None:
    if detail is None:
        return None
    return {tokenizer.token_text(token): raw for token, raw, _ in detail.top}


def _top_display(tokenizer: Tokenizer, top: Sequence[tuple[int, float]] | None) -> list[dict[str, Any]] | None:
    """The extension beside OpenAI's top_logprobs: the same candidates as a list, most
    likely first, each with its id and `Tokenizer.display` (what the page shows). A list,
    not an object keyed by text: two tokens can look alike, and JavaScript reorders keys
    that look like numbers."""
    if top is None:
        return None
    return [{"id": token, "display": tokenizer.display(token), "logprob": logprob} for token, logprob in top]


def prompt_logprobs(model: GPT, tokenizer: Tokenizer, ids: Sequence[int], k: int, window: str) -> dict[str, list]:
    """OpenAI's logprobs of an echoed prompt: each token's log-probability given the ones
    before it (none for the first) and the top k alternatives there, teacher-forced through
    the token loop's context (`forced_logprobs`): past the context it is read through the
    window as a generation that reached that length would read it."""
    chosen, top = [], []
    for t, logprobs in enumerate(forced_logprobs(model, [ids[:1]], [ids[1:]], window=window,
                                                 valid_vocab=tokenizer.vocab_size)):
        chosen.append(logprobs[0, ids[t + 1]].item())
        if k:
            values, best = logprobs[0].topk(min(k, logprobs.size(-1)))
            top.append(list(zip(best.tolist(), values.tolist())))
        else:
            top.append(None)
    texts = [tokenizer.decode([t]) for t in ids]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(ids))]
    return {"tokens": [tokenizer.token_text(t) for t in ids], "token_logprobs": [None, *chosen],
            "top_logprobs": [None, *({tokenizer.token_text(i): v for i, v in c} if c else None for c in top)],
            "text_offset": offsets, "display_tokens": [tokenizer.display(t) for t in ids],
            "top_display": [None, *(_top_display(tokenizer, c) for c in top)]}


# ----------------------------------------------------------------------------------------
# The distribution view.


def distribution(model: GPT, tokenizer: Tokenizer, ids: Sequence[int], specs: Sequence[tuple[str, DecodingSpec]],
                 top: int, window: str = "exact") -> dict[str, Any]:
    """The next-token distribution after ``ids``: the ``top`` most likely candidates, and for
    each strategy the set `process_logits` keeps with its renormalised probabilities.
    A repetition penalty treats the context as seen (as generation treats the prompt);
    frequency and presence penalties count generated tokens, of which a context has none.
    ``context_text`` is the context without its end-of-text tokens (what a text box shows).
    Each strategy's ``keeps_candidates`` says, for each of ``candidates`` in their order,
    whether it keeps that token: the page marks each strategy's cut on one chart with it."""
    context = Context(model, [list(ids)], 0, window, tokenizer.vocab_size)
    logits = context.next_logits()  # (1, V)
    probs = torch.softmax(logits.double(), dim=-1)[0]
    entropy = -torch.where(probs > 0, probs * probs.log(), 0.0).sum().item()
    best = probs.argsort(descending=True, stable=True)[:top]
    strategies = []
    for text, spec in specs:
        # the state of a generation's first step: the context is seen, nothing generated yet
        state = PenaltyState(spec, [ids], logits.size(-1), logits.device, breaker_ids=dry_breakers(tokenizer, spec),
                             context_size=model.config.block_size)
        processed = state.process(logits, spec)  # XTC: as when its coin comes up
        kept_probs = sampling_distribution(processed, spec, torch.float64)[0]
        kept = (kept_probs > 0).nonzero().squeeze(1)
        order = kept[kept_probs[kept].argsort(descending=True, stable=True)][:top]
        strategies.append({
            "strategy": text, "label": spec.label, "kept_count": int(kept.numel()),
            "kept_mass": float(probs[kept].sum()),
            "kept": [_candidate(tokenizer, int(t), float(probs[t]), float(kept_probs[t])) for t in order],
            "keeps_candidates": (kept_probs[best] > 0).tolist(),
        })
    return {
        "prompt_tokens": len(ids), "context_ids": list(ids),
        "context_text": tokenizer.decode([t for t in ids if t != tokenizer.eot_id]),
        "context_display": [tokenizer.display(t) for t in ids], "entropy_bits": entropy / math.log(2),
        "candidates": [_candidate(tokenizer, int(t), float(probs[t])) for t in best],
        "strategies": strategies,
    }


def _candidate(tokenizer: Tokenizer, token: int, prob: float, kept_prob: float | None = None) -> dict[str, Any]:
    entry = {"id": token, "text": tokenizer.token_text(token), "display": tokenizer.display(token),
             "prob": prob, "logprob": math.log(prob) if prob > 0 else None}
    if kept_prob is not None:
        entry["kept_prob"] = kept_prob
    return entry


def distribution_request(body: dict, settings: ServeSettings, tokenizer: Tokenizer):
    _check_fields(body, _DISTRIBUTION_FIELDS)
    _check_model(body, settings)
    prompts, _ = read_prompts(body.get("prompt"), tokenizer)
    if len(prompts) != 1:
        raise RequestError("the distribution view takes one prompt", "prompt")
    strategies = body.get("strategies", ["greedy", "top-p:p=0.9"])
    if not isinstance(strategies, list) or len(strategies) > 16:
        raise RequestError("strategies must be a list of at most 16 strategy specs such as 'top-p:p=0.9'",
                           "strategies")
    specs = []
    for index, text in enumerate(strategies):
        if not isinstance(text, str):
            raise RequestError(f"strategies[{index}] must be a string such as 'top-p:p=0.9'", f"strategies[{index}]")
        try:
            spec = parse_strategy(text)
        except UserError as error:
            raise RequestError(str(error), f"strategies[{index}]") from None
        if spec.is_beam:
            raise RequestError(f"strategies[{index}]: beam search has no next-token distribution of its own",
                               f"strategies[{index}]")
        specs.append((text, spec))
    top = _whole(body, "top", 20, 1, MAX_CANDIDATES)
    return prompts[0], specs, top


# ----------------------------------------------------------------------------------------
# Admission: bounded concurrency with a bounded queue.


class Admission:
    """At most ``slots`` holders at once, at most ``waiting`` more in line; `admit` refuses
    beyond that. Used from the event loop only (its counters need no lock)."""

    def __init__(self, slots: int, waiting: int):
        self.slots, self.max_waiting = slots, waiting
        self.running = self.waiting = 0
        self._semaphore = asyncio.Semaphore(slots)

    def admit(self) -> Ticket:
        if self.running + self.waiting >= self.slots + self.max_waiting:
            raise RequestError(f"the server is busy ({self.running} requests running, {self.waiting} waiting); "
                               f"retry after {RETRY_AFTER_S} s", status=503, kind="server_busy",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
        self.waiting += 1
        return Ticket(self)


class Ticket:
    """A place in line; ``async with ticket`` waits for a slot and holds it. `close` gives
    up a place never used (a response that was never sent)."""

    def __init__(self, admission: Admission):
        self._admission, self._state = admission, "waiting"

    async def __aenter__(self) -> None:
        await self._admission._semaphore.acquire()  # cancelled while waiting: close() gives the place back
        self._admission.waiting -= 1
        self._admission.running += 1
        self._state = "running"

    async def __aexit__(self, *exc) -> None:
        self._admission.running -= 1
        self._admission._semaphore.release()
        self._state = "done"

    def close(self) -> None:
        if self._state == "waiting":
            self._admission.waiting -= 1
            self._state = "done"


class _TicketedStream(StreamingResponse):
    """A stream that gives its ticket back however it ends, and closes its body (which stops
    the generation) when the client goes away."""

    def __init__(self, content: AsyncIterator[str], ticket: Ticket):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._ticket.close()


# ----------------------------------------------------------------------------------------
# The app.


class Server:
    """One model behind the HTTP endpoints (the state of one app; no globals)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, settings: ServeSettings,
                 speculation: Speculation | None = None):
        if speculation is not None and settings.window == "none":
            raise UserError("speculative decoding rolls back the KV cache, and window none has no cache")
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.speculation = speculation
        self.admission = Admission(settings.max_concurrent, settings.max_waiting)
        self.created = int(time.time())
        self.generated_tokens = 0  # for /health: shows that work stops when clients leave
        self.stopping = False  # set when the server shuts down: running generations end at their next step

    def stop(self) -> None:
        self.stopping = True

    async def _body(self, request: Request) -> dict:
        # Only JSON: a browser sends a cross-site POST of text/plain or a form without
        # asking, but one of application/json only after a CORS preflight, which this
        # server never grants; so no other site's page can make it generate.
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise RequestError(f"the request body must be JSON, sent with Content-Type: application/json "
                               f"(got {media_type or 'none'!r})", status=415)
        chunks, size = [], 0
        try:
            with anyio.fail_after(self.settings.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes", status=413,
                                           headers={"Connection": "close"})
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(f"the request body did not arrive within {self.settings.body_timeout_s:g} s",
                               status=408, headers={"Connection": "close"}) from None
        try:
            body = json.loads(b"".join(chunks))
        except RecursionError:
            raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
        except (UnicodeDecodeError, ValueError) as e:  # ValueError: also an integer too long to convert
            raise RequestError(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        _check_json(body)
        return body

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        a = self.admission
        return JSONResponse({"status": "ok", "running": a.running, "waiting": a.waiting,
                             "max_concurrent": a.slots, "max_waiting": a.max_waiting,
                             "generated_tokens": self.generated_tokens})

    async def models(self, request: Request) -> Response:
        cfg = self.model.config
        return JSONResponse({"object": "list", "data": [{
            "id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "tinygpt",
            "max_model_len": cfg.block_size, "vocab_size": self.tokenizer.vocab_size,
            "tokenizer": self.tokenizer.name, "max_tokens": self.settings.max_tokens,
        }]})

    async def distribution(self, request: Request) -> Response:
        ids, specs, top = distribution_request(await self._body(request), self.settings, self.tokenizer)
        ticket = self.admission.admit()
        try:
            async with ticket:
                result = await anyio.to_thread.run_sync(_inference, distribution, self.model, self.tokenizer, ids,
                                                        specs, top, self.settings.window)
        finally:
            ticket.close()
        return JSONResponse({"model": self.settings.model_name, **result})

    async def completions(self, request: Request) -> Response:
        job = completion_job(await self._body(request), self.settings, self.tokenizer)
        events = completion_events(self.model, self.tokenizer, job, self.settings.window, self.speculation)
        ticket = self.admission.admit()
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if job.stream:
            return _TicketedStream(self._sse(job, events, ticket, completion_id, created), ticket)
        try:
            async with ticket:
                result = await self._collect(job, events, request)
        finally:
            ticket.close()
        if result is None:  # the client left; nobody reads an answer
            return Response(status_code=499)
        choices, generated = result
        return JSONResponse({"id": completion_id, "object": "text_completion", "created": created,
                             "model": self.settings.model_name, "choices": choices, "usage": _usage(job, generated)})

    async def _steps(self, events: Iterator[list[Event]]) -> AsyncIterator[list[Event]]:
        """The event stream, each step computed in a worker thread so the event loop stays
        free; closing this iterator stops the generation."""
        try:
            while not self.stopping:
                step = await anyio.to_thread.run_sync(_inference, next, events, None)
                if step is None:
                    break
                self.generated_tokens += _tokens(step)
                yield step
        finally:
            events.close()

    def _choices(self, job: CompletionJob) -> list[dict[str, Any]]:
        """The choices before the first token: the echoed prompt (with its logprobs)."""
        echoed = {p: prompt_logprobs(self.model, self.tokenizer, job.prompts[p], job.logprobs, self.settings.window)
                  for p in range(len(job.prompts))} if job.echo and job.logprobs is not None else {}
        choices = []
        for row in range(job.rows):
            prompt = row // job.n
            # each choice gets its own lists: the n samples of a prompt append different tokens to them
            logprobs = {key: list(value) for key, value in echoed[prompt].items()} if prompt in echoed else None
            choice = _choice(row, job, job.prompt_texts[prompt] if job.echo else "", logprobs)
            if job.return_token_ids:
                choice["prompt_token_ids"] = job.prompts[prompt]
            choices.append(choice)
        return choices

    async def _collect(self, job: CompletionJob, events: Iterator[list[Event]],
                       request: Request) -> tuple[list[dict], int] | None:
        # the echoed prompt's logprobs are a pass of the model: in a worker thread, as every step
        choices, generated = await anyio.to_thread.run_sync(_inference, self._choices, job), 0
        async with contextlib.aclosing(self._steps(events)) as steps:
            async for step in steps:
                if await request.is_disconnected():
                    return None
                for event in step:
                    self._apply(choices[event.row], event, job)
                generated += _tokens(step)
        return choices, generated

    async def _sse(self, job: CompletionJob, events: Iterator[list[Event]], ticket: Ticket, completion_id: str,
                   created: int) -> AsyncIterator[bytes]:
        def chunk(choices: list[dict], **extra) -> bytes:  # encoded here, so that a failure is caught below
            payload = {"id": completion_id, "object": "text_completion", "created": created,
                       "model": self.settings.model_name, "choices": choices, **extra}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

        generated = 0
        try:
            async with ticket:
                if job.echo or job.return_token_ids:
                    yield chunk(await anyio.to_thread.run_sync(_inference, self._choices, job))
                async with contextlib.aclosing(self._steps(events)) as steps:
                    async for step in steps:
                        generated += _tokens(step)
                        for event in step:
                            piece = _choice(event.row, job, "")
                            self._apply(piece, event, job)
                            if (piece["text"] or piece["finish_reason"] or job.logprobs is not None
                                    or job.return_token_ids):
                                yield chunk([piece])
            if job.include_usage:
                yield chunk([], usage=_usage(job, generated))
        except Exception as error:  # a bug, after the 200 went out: say so in the stream (OpenAI's error
            # chunk, which its clients raise), log it, and still end the stream as every stream ends
            logging.getLogger("uvicorn.error").exception("error in a completion stream")
            yield f"data: {_server_error(error).body()}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def _apply(self, choice: dict[str, Any], event: Event, job: CompletionJob) -> None:
        """Add one event to a choice in OpenAI's shape: finish_reason "stop" for the
        end-of-text token and for a stop string, "length" at max_tokens."""
        choice["text"] += event.text
        if event.token is not None:
            if choice["logprobs"] is not None:
                logprobs = choice["logprobs"]
                echoed = len(job.prompt_texts[event.row // job.n]) if job.echo else 0
                logprobs["tokens"].append(self.tokenizer.token_text(event.token))
                logprobs["token_logprobs"].append(event.logprob)
                logprobs["top_logprobs"].append(_top_logprobs(self.tokenizer, event.detail))
                logprobs["text_offset"].append(echoed + event.offset)
                logprobs["display_tokens"].append(self.tokenizer.display(event.token))
                logprobs["top_display"].append(_top_display(
                    self.tokenizer, None if event.detail is None else [(t, raw) for t, raw, _ in event.detail.top]))
            if "token_ids" in choice:
                choice["token_ids"].append(event.token)
        if event.finish is not None:
            choice["finish_reason"] = "length" if event.finish == "length" else "stop"
        if event.speculation is not None:  # decoded speculatively (serve --draft): how its proposals went
            counts = event.speculation
            choice["speculation"] = {"proposed": counts.proposed, "accepted": counts.accepted,
                                     "target_passes": counts.passes}

    def app(self) -> Starlette:
        """The Starlette app; ``app.state.server`` is this object."""
        routes = [
            Route("/", self.page), Route("/health", self.health), Route("/v1/models", self.models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/distribution", self.distribution, methods=["POST"]),
        ]
        app = Starlette(routes=routes, middleware=[Middleware(HostCheck, allowed=self.settings.allowed_hosts)],
                        exception_handlers={
            RequestError: lambda request, error: error.response(),
            HTTPException: lambda request, error: RequestError(  # 405 comes with its Allow header
                str(error.detail), status=error.status_code, headers=error.headers,
                kind="not_found_error" if error.status_code == 404 else "invalid_request_error").response(),
            # The client went away while sending its body: nobody reads an answer, and it is
            # no error of the server's (nothing to log).
            ClientDisconnect: lambda request, error: Response(status_code=499),
            # A bug: the same one-line JSON as any error (Starlette logs its traceback).
            Exception: lambda request, error: _server_error(error).response(),
        })
        app.state.server = self
        return app


class HostCheck:
    """ASGI middleware: a request whose Host header names another host than ``allowed``
    gets a 421 (see `ServeSettings.allowed_hosts`). A request without one (HTTP/1.0) is
    let through: every browser sends it, and only a browser can be misled by DNS."""

    def __init__(self, app, allowed: Sequence[str]):
        self.app, self.allowed = app, {_host_name(host) for host in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            host = Headers(scope=scope).get("host")
            if host is not None and _host_name(host) not in self.allowed:
                error = RequestError(f"this server does not answer for host {host!r}; it answers for "
                                     f"{', '.join(sorted(self.allowed))} (sample.py serve --allow-host adds one)",
                                     status=421)
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name of a Host header ("[::1]:8000" -> "::1", "Localhost." -> "localhost")."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.removesuffix(".")


def _server_error(error: BaseException) -> RequestError:
    return RequestError(f"internal server error ({type(error).__name__}: {error})", status=500, kind="server_error")


def _inference(function, *args):
    """Run ``function`` in a worker thread under inference mode (a thread-local setting)."""
    with torch.inference_mode():
        return function(*args)


def _choice(row: int, job: CompletionJob, text: str, logprobs: dict[str, list] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": row, "text": text, "logprobs": None, "finish_reason": None}
    if job.logprobs is not None:
        choice["logprobs"] = logprobs or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [],
                                          "display_tokens": [], "top_display": []}
    if job.return_token_ids:
        choice["token_ids"] = []
    return choice


def _tokens(step: list[Event]) -> int:
    return sum(event.token is not None for event in step)


def _usage(job: CompletionJob, generated: int) -> dict[str, int]:
    prompt = sum(len(p) for p in job.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def create_app(model: GPT, tokenizer: Tokenizer, settings: ServeSettings,
               speculation: Speculation | None = None) -> Starlette:
    """The ASGI app serving ``model`` (completions made speculatively with ``speculation``,
    see `completion_events`); run it with uvicorn (see `serve_forever`)."""
    return Server(model, tokenizer, settings, speculation).app()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a UserError saying why not (port in use, unknown host)."""
    if not 0 <= port <= 65535:
        raise UserError(f"port {port} is out of range; it must be in [0, 65535] (0: any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Starlette, *, access_log: bool = False, graceful_shutdown_s: float = 5):
    """How uvicorn runs ``app`` (sample.py serve and the tests alike): HTTP/1.1 by h11, and
    a connection that has no complete request for the settings' ``idle_timeout_s`` is closed."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        """uvicorn's h11 protocol, whose keep-alive timer starts after each response only
        and stops at the first byte that comes: a connection that never sends a request,
        or sends its headers a byte at a time, would stay open for ever. Here the timer
        also starts when the connection opens, and only a complete request stops it."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

        def data_received(self, data: bytes) -> None:  # H11Protocol's, less the timer's stop
            self.conn.receive_data(data)
            self.handle_events()  # stops the timer once a request's headers are complete

    config = uvicorn.Config(app, http=TimedH11Protocol, log_level="warning", access_log=access_log,
                            timeout_keep_alive=app.state.server.settings.idle_timeout_s,
                            timeout_graceful_shutdown=graceful_shutdown_s)
    if access_log:  # Config set every uvicorn logger to "warning", which hides the access lines (info)
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    return config


def serve_forever(app: Starlette, sock: socket.socket, *, access_log: bool = False) -> None:
    """Run ``app`` on ``sock`` with uvicorn until Ctrl-C or SIGTERM, which stop it cleanly
    (open streams get a moment to end, then are closed)."""
    import uvicorn

    class Stopping(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.server.stop()  # so that open streams end now instead of being cancelled
            super().handle_exit(sig, frame)

    Stopping(uvicorn_config(app, access_log=access_log)).run(sockets=[sock])
