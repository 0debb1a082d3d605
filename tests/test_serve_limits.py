"""The server against hostile or broken clients (issue 17): bodies no parser should
recurse into, text that is not Unicode, clients that leave or stall, requests from other
sites' pages. Every refusal is one line of JSON naming the field; nothing is a 500, and
nothing the client does writes a traceback to the server's log."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time

import pytest
import torch

from live_server import LiveServer
from model.gpt import GPT
from model.serve import ServeSettings, create_app
from model.tokenizer import BPETokenizer
from tests.conftest import tiny_config

PROMPT = "The quick"


@pytest.fixture(scope="module")
def server(loaded):
    with LiveServer(create_app(*loaded, ServeSettings("tiny", max_tokens=64))) as live:
        yield live


@pytest.fixture(scope="module")
def bpe_server():
    """A byte-level BPE model (untrained): it encodes any text, so a prompt is never refused
    for its characters."""
    torch.manual_seed(0)
    tokenizer = BPETokenizer({bytes([i]): i for i in range(256)})
    model = GPT(tiny_config(vocab_size=tokenizer.vocab_size)).eval()
    with LiveServer(create_app(model, tokenizer, ServeSettings("bpe", max_tokens=8))) as live:
        yield live


@contextlib.contextmanager
def server_log():
    """The messages uvicorn logs (where it writes an application's tracebacks) meanwhile.
    Entered after the server is made: uvicorn's logging set-up drops earlier handlers."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def one_line_error(status: int, text: str, expected_status: int, param: str | None = None) -> dict:
    assert status == expected_status, text
    assert "\n" not in text.strip()
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return error


def sse_events(text: str) -> list[str]:
    events = [event for event in text.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events), text
    return [event.removeprefix("data: ") for event in events]


# ----------------------------------------------------------------------------- bodies no parser should recurse into


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_a_400(server, depth):
    body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    error = one_line_error(*server.post("/v1/completions", body)[::2], 400, None if depth > 1000 else "prompt")
    assert "nests deeper than" in error["message"]


def test_an_integer_too_long_to_read_is_a_400(server):
    status, _, text = server.post("/v1/completions", b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}")
    assert "digits" in one_line_error(status, text, 400)["message"]


# ----------------------------------------------------------------------------- lone surrogates: JSON, not text

SURROGATE = "\\ud800"  # as the JSON escape a client sends


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", f'{{"prompt": "x", "{SURROGATE}": 1}}', "\\ud800"),
    ("/v1/completions", f'{{"prompt": "x", "model": "{SURROGATE}"}}', "model"),
    ("/v1/completions", f'{{"prompt": "x", "strategy": "top-p:p={SURROGATE}"}}', "strategy"),
    ("/v1/completions", f'{{"prompt": "x", "stop": ["a", "{SURROGATE}"]}}', "stop[1]"),
    ("/v1/distribution", f'{{"prompt": "x", "strategies": ["greedy", "top-{SURROGATE}"]}}', "strategies[1]"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, param):
    status, _, text = server.post(path, body.encode())
    assert "Unicode" in one_line_error(status, text, 400, param)["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_surrogate_prompt_for_a_byte_level_model_is_a_400(bpe_server, stream):
    body = f'{{"prompt": "a{SURROGATE}b", "echo": true, "logprobs": 1, "stream": {json.dumps(stream)}}}'
    status, _, text = bpe_server.post("/v1/completions", body.encode())
    one_line_error(status, text, 400, "prompt")
    status, _, text = bpe_server.post("/v1/completions", {"prompt": "a\u00e9b", "echo": True, "logprobs": 1,
                                                          "stream": stream, "max_tokens": 3})
    assert status == 200, text  # the same request with real text is served
    if stream:
        events = sse_events(text)
        assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["text"] == "a\u00e9b"
    else:
        assert json.loads(text)["choices"][0]["text"].startswith("a\u00e9b")


def fail_at_step(monkeypatch, model, step: int) -> None:
    """Make the model fail at its ``step``-th call, as a device that runs out of memory."""
    forward, calls = model.forward, []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing_forward)


def test_a_failure_is_a_one_line_json_500(loaded, monkeypatch):
    model, tokenizer = loaded
    with LiveServer(create_app(model, tokenizer, ServeSettings("tiny", max_tokens=64))) as live, server_log() as log:
        fail_at_step(monkeypatch, model, 2)
        status, _, text = live.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 20})
        deadline = time.monotonic() + 5  # uvicorn logs it after the answer went out
        while not log and time.monotonic() < deadline:
            time.sleep(0.01)
    error = one_line_error(status, text, 500)
    assert error["type"] == "server_error" and "out of memory" in error["message"]
    assert [r.getMessage() for r in log] == ["Exception in ASGI application\n"]  # a bug is logged, once


def test_a_stream_that_fails_midway_says_so_and_still_ends_with_done(loaded, monkeypatch):
    model, tokenizer = loaded
    with LiveServer(create_app(model, tokenizer, ServeSettings("tiny", max_tokens=64))) as live, server_log() as log:
        fail_at_step(monkeypatch, model, 4)
        status, _, text = live.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "stream": True})
    assert status == 200
    events = sse_events(text)
    assert len(events) == 5 and events[-1] == "[DONE]"
    assert all(json.loads(e)["choices"][0]["text"] for e in events[:3])
    error = json.loads(events[3])["error"]
    assert error["type"] == "server_error" and "out of memory" in error["message"]
    assert [r.getMessage() for r in log] == ["error in a completion stream"]  # a bug is logged, once


# ----------------------------------------------------------------------------- clients that leave or stall


def send_partial(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def half_a_post(length: int = 1000) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + b'{"prompt": "')


def test_a_client_that_leaves_mid_upload_leaves_no_traceback(server):
    with server_log() as log:
        for _ in range(20):
            send_partial(server.port, half_a_post()).close()
        time.sleep(0.5)
        assert server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200
    assert [r.getMessage() for r in log] == []


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends before it closes the connection, which must be within ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    while chunk := sock.recv(65536):  # a timeout here is the test failing
        received += chunk
    return received


@pytest.fixture(scope="module")
def impatient_server(loaded):
    settings = ServeSettings("tiny", max_tokens=8, idle_timeout_s=0.5, body_timeout_s=0.5)
    with LiveServer(create_app(*loaded, settings)) as live:
        yield live


def test_idle_and_half_sent_connections_are_closed(impatient_server):
    port = impatient_server.port
    with server_log() as log:
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        half_headers = send_partial(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        half_body = send_partial(port, half_a_post())
        dripping = send_partial(port, b"GET /health HTTP/1.1\r\nX: ")
        with pytest.raises(OSError):  # a byte at a time does not keep a connection open: it is closed
            for _ in range(30):
                time.sleep(0.1)
                dripping.sendall(b"x")
        assert closed_within(idle, 3) == b""
        assert closed_within(half_headers, 3) == b""
        status_line, _, rest = closed_within(half_body, 3).partition(b"\r\n")
        assert status_line == b"HTTP/1.1 408 Request Timeout"
        one_line_error(408, rest.partition(b"\r\n\r\n")[2].decode(), 408)
        # a connection kept alive between requests is closed once idle too
        kept = send_partial(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b'"status":"ok"' in closed_within(kept, 3).replace(b" ", b"")
    assert [r.getMessage() for r in log] == []


def test_the_default_timeouts_are_bounded():
    settings = ServeSettings("x")
    assert 5 <= settings.idle_timeout_s <= 30 and 5 <= settings.body_timeout_s <= 30


# ----------------------------------------------------------------------------- methods, content types, hosts


def test_405_says_which_methods_are_allowed(server):
    status, headers, text = server.post("/health", {})
    one_line_error(status, text, 405)
    assert set(headers["Allow"].split(", ")) == {"GET", "HEAD"}
    status, headers, text = server.post("/v1/completions", b"", headers={}, method="GET")
    assert status == 405 and headers["Allow"] == "POST"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_post_that_is_not_json_is_refused_before_any_work(server, content_type):
    """A page of any site may POST these to 127.0.0.1 without asking (no CORS preflight)."""
    before = server.get("/health")["generated_tokens"]
    body = json.dumps({"prompt": PROMPT, "max_tokens": 5}).encode()
    status, _, text = server.post("/v1/completions", body, headers={"Content-Type": content_type} if content_type
                                  else {"X-No-Content-Type": "1"})
    assert "Content-Type: application/json" in one_line_error(status, text, 415)["message"]
    assert server.get("/health")["generated_tokens"] == before


def test_json_with_a_charset_is_json(server):
    status, _, _ = server.post("/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode(),
                               headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200


@pytest.mark.parametrize(("host", "served"), [
    ("127.0.0.1", True), ("localhost:8000", True), ("LOCALHOST.", True), ("[::1]:8000", True),
    ("evil.example", False), ("127.0.0.1.evil.example", False), ("evil.example:8000", False),
])
def test_only_requests_for_this_host_are_served(server, host, served):
    """A page of evil.example whose name now points at 127.0.0.1 (DNS rebinding) still sends
    Host: evil.example."""
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
        body = json.dumps({"prompt": PROMPT, "max_tokens": 1}).encode()
        status, _, text = server.post(path, body, {"Host": host, "Content-Type": "application/json"}, method)
        if served:
            assert status == 200, text
        else:
            assert "does not answer for host" in one_line_error(status, text, 421)["message"]


@pytest.mark.parametrize(("allowed", "host", "served"), [
    (("localhost", "box.lan"), "box.lan:8000", True), (("localhost",), "127.0.0.1", False), (("*",), "any.where", True),
])
def test_allowed_hosts_are_a_setting(loaded, allowed, host, served):
    with LiveServer(create_app(*loaded, ServeSettings("tiny", allowed_hosts=allowed))) as live:
        status, _, _ = live.post("/health", b"", {"Host": host}, "GET")
    assert (status == 200) == served


def test_the_access_log_prints_one_line_per_request(loaded, capfd):
    model, tokenizer = loaded
    with LiveServer(create_app(model, tokenizer, ServeSettings("tiny")), access_log=True) as live:
        live.get("/health")
        live.post("/v1/completions", {"prompt": "The", "max_tokens": 2})
        time.sleep(0.2)
    printed = capfd.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if "HTTP/1.1" in line]
    assert any('"GET /health HTTP/1.1" 200' in line for line in lines), printed
    assert any('"POST /v1/completions HTTP/1.1" 200' in line for line in lines), printed
