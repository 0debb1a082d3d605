"""The server (model/serve.py) against a live uvicorn on 127.0.0.1, through the real
`openai` client and plain HTTP. The truths it is held to: sample.py's own output for the
same request, the model's logits computed directly, process_logits, and the request
limits written in the issue."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.conftest import ROOT

import sample
from live_server import LiveServer
from model.decoding import process_logits
from model.strategy import parse_strategy
from model.serve import ServeSettings, create_app, listen
from model.tokenizer import BPETokenizer

PROMPT = "The quick"


@pytest.fixture(scope="module")
def server(loaded):
    model, tokenizer = loaded
    settings = ServeSettings("tiny", max_tokens=64, max_concurrent=2, max_waiting=4)
    with LiveServer(create_app(model, tokenizer, settings)) as live:
        yield live


def sample_py_text(capsys, checkpoint, *flags: str) -> str:
    """What `python sample.py CKPT --prompt PROMPT ...` prints after the prompt."""
    capsys.readouterr()
    assert sample.main([str(checkpoint), "--prompt", PROMPT, "--device", "cpu", *flags]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(PROMPT) and printed.endswith("\n")
    return printed[len(PROMPT) : -1]


def test_completion_is_what_sample_py_prints_with_that_seed(server, tiny_checkpoint, capsys):
    client = server.client()
    request = dict(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0.8, seed=3, extra_body={"top_k": 5})
    first = client.completions.create(**request)
    again = client.completions.create(**request)
    other_seed = client.completions.create(**{**request, "seed": 4})
    expected = sample_py_text(capsys, tiny_checkpoint, "--strategy", "top-k", "--top-k", "5", "--temperature", "0.8",
                              "--seed", "3", "--max-new-tokens", "30")
    assert first.choices[0].text == expected
    assert again.choices[0].text == expected
    assert other_seed.choices[0].text != expected
    assert first.choices[0].finish_reason == "length"
    assert first.usage.prompt_tokens == len(PROMPT) and first.usage.completion_tokens == 30


def test_greedy_and_top_p_match_sample_py(server, tiny_checkpoint, capsys):
    client = server.client()
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    assert greedy.choices[0].text == sample_py_text(capsys, tiny_checkpoint, "--strategy", "greedy",
                                                    "--max-new-tokens", "20")
    nucleus = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, top_p=0.7, seed=9,
                                        extra_body={"repetition_penalty": 1.3})
    assert nucleus.choices[0].text == sample_py_text(capsys, tiny_checkpoint, "--strategy", "top-p", "--top-p", "0.7",
                                                     "--repetition-penalty", "1.3", "--seed", "9",
                                                     "--max-new-tokens", "20")


def test_stream_gives_the_same_text_piece_by_piece_and_ends_with_done(server):
    client = server.client()
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=25, seed=11)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=25, seed=11, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 10  # streamed token by token, not in one piece
    assert "".join(pieces) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 25
    status, headers, body = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in body.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_logprobs_are_the_models_own(server, loaded):
    model, tokenizer = loaded
    result = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=2, logprobs=3)
    choice = result.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == list(range(12))
    # independent truth: one forward pass over prompt + completion
    ids = tokenizer.encode(PROMPT + choice.text)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    log_probs = torch.log_softmax(logits[0].double(), dim=-1)
    start = len(PROMPT)
    for i, (token, logprob, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        row = log_probs[start - 1 + i]
        assert logprob == pytest.approx(row[tokenizer.encode(token)[0]].item(), abs=1e-4)
        expected_top = row.topk(3).indices.tolist()
        assert list(top) == [tokenizer.decode([t]) for t in expected_top]
        assert max(top.values()) == pytest.approx(row.max().item(), abs=1e-4)


def test_n_samples_use_seed_plus_index(server):
    client = server.client()
    several = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=15, n=3, seed=20)
    assert [c.index for c in several.choices] == [0, 1, 2]
    alone = [client.completions.create(model="tiny", prompt=PROMPT, max_tokens=15, seed=20 + i).choices[0].text
             for i in range(3)]
    assert [c.text for c in several.choices] == alone
    assert len(set(alone)) > 1


def test_stop_string_ends_the_text_before_it(server):
    client = server.client()
    free = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, seed=5).choices[0]
    assert " " in free.text
    stopped = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, seed=5, stop=[" ", "zz"])
    assert stopped.choices[0].text == free.text[: free.text.index(" ")]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, seed=5, stop=" ", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text


def test_echo_prompt_list_and_token_ids(server, loaded):
    _, tokenizer = loaded
    client = server.client()
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, seed=1, echo=True, logprobs=1)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, seed=1)
    choice = echoed.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text
    assert choice.logprobs.tokens[: len(PROMPT)] == list(PROMPT) and choice.logprobs.token_logprobs[0] is None
    by_ids = client.completions.create(model="tiny", prompt=tokenizer.encode(PROMPT), max_tokens=5, seed=1)
    assert by_ids.choices[0].text == plain.choices[0].text
    two = client.completions.create(model="tiny", prompt=[PROMPT, "A small"], max_tokens=5, n=2, seed=1)
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.choices[0].text == plain.choices[0].text


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = server.get("/health")
    assert health["status"] == "ok" and health["max_concurrent"] == 2


def test_distribution_is_process_logits_of_the_context(server, loaded):
    model, tokenizer = loaded
    strategies = ["greedy", "top-p:p=0.6", "top-k:k=4,t=0.7", "min-p:p=0.1", "typical:p=0.5", "sample:rep=1.5"]
    status, _, body = server.post("/v1/distribution", {"prompt": PROMPT, "strategies": strategies, "top": 50})
    assert status == 200, body
    view = json.loads(body)
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0, -1:].float()
    probs = torch.softmax(logits.double(), dim=-1)[0]
    assert [c["id"] for c in view["candidates"]][:5] == probs.argsort(descending=True)[:5].tolist()
    assert sum(c["prob"] for c in view["candidates"]) == pytest.approx(1, abs=1e-6)  # top 50 > vocab: all of it
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[0, ids] = True
    for text, shown in zip(strategies, view["strategies"]):
        spec = parse_strategy(text)
        processed = process_logits(logits, spec, seen=seen, counts=torch.zeros_like(logits))[0]
        if spec.is_greedy:
            expected = {int(processed.argmax()): 1.0}
        else:
            kept_probs = torch.softmax(processed.double(), dim=-1)
            expected = {i: kept_probs[i].item() for i in torch.nonzero(kept_probs > 0).flatten().tolist()}
        assert {c["id"]: c["kept_prob"] for c in shown["kept"]} == pytest.approx(expected, abs=1e-6), text
        assert shown["kept_count"] == len(expected)
        assert shown["keeps_candidates"] == [c["id"] in expected for c in view["candidates"]], text
        assert shown["kept_mass"] == pytest.approx(sum(probs[i].item() for i in expected), abs=1e-6)
    assert view["context_ids"] == ids and view["context_text"] == PROMPT


BAD_REQUESTS = [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 65}, 400, "max_tokens"),  # above the server's cap (64)
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "top_k": 2.5}, 400, "top_k"),
    ({"prompt": "x", "min_p": 2}, 400, "min_p"),
    ({"prompt": "x", "typical_p": 0}, 400, "typical_p"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "frequency_penalty": 3}, 400, "frequency_penalty"),
    ({"prompt": "x", "temperature": 0, "top_p": 0.5}, 400, "top_p"),
    ({"prompt": "x", "top_kk": 5}, 400, "top_kk"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "stop": ["a", 3]}, 400, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "caf\u00e9 \u2603"}, 400, "prompt"),  # characters the char tokenizer never saw
    ({"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": {"text": "x"}}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"\xff\xfe", 400, None),
    (b"x" * ((1 << 20) + 1), 413, None),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_a_one_line_json_error_naming_the_field(server, body, status, param):
    got, headers, text = server.post("/v1/completions", body)
    assert got == status, text
    assert "\n" not in text.strip()
    error = json.loads(text)["error"]
    assert error["param"] == param and error["message"] and "\n" not in error["message"]
    if param and param not in ("prompt", "model"):
        assert param in error["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "strategies": ["top-q:p=0.5"]}, "strategies[0]"),
    ({"prompt": "x", "strategies": ["greedy", "top-p:p=1.5"]}, "strategies[1]"),
    ({"prompt": "x", "strategies": ["beam:n=2"]}, "strategies[0]"),
    ({"prompt": "x", "strategies": "greedy"}, "strategies"),
    ({"prompt": "x", "top": 0}, "top"),
    ({"prompt": ["x", "y"]}, "prompt"),
])
def test_bad_distribution_requests(server, body, param):
    status, _, text = server.post("/v1/distribution", body)
    assert status == 400 and json.loads(text)["error"]["param"] == param


def test_unknown_path_and_method_are_json_errors(server):
    status, _, text = server.post("/v1/chat/nothing", {})
    assert status == 404 and json.loads(text)["error"]["type"] == "not_found_error"
    status, _, text = server.post("/health", {})
    assert status == 405 and json.loads(text)["error"]


def open_stream(server: LiveServer, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    return connection, response


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_busy_server_answers_503_and_a_client_that_leaves_stops_its_generation(loaded):
    model, tokenizer = loaded
    settings = ServeSettings("tiny", max_tokens=1_000_000, max_concurrent=1, max_waiting=1)
    with LiveServer(create_app(model, tokenizer, settings)) as live:
        # greedy: this model loops without end-of-text, so the first stream runs until its client
        # leaves (sampled with a random seed it could end by itself within a few dozen tokens)
        first, response = open_stream(live, {"prompt": PROMPT, "max_tokens": 1_000_000, "temperature": 0})
        response.readline()  # generation has begun
        wait_for(lambda: live.get("/health")["running"] == 1)
        second = threading.Thread(target=live.post, args=("/v1/completions", {"prompt": PROMPT, "max_tokens": 3}))
        second.start()  # waits in line (max_waiting=1)
        wait_for(lambda: live.get("/health")["waiting"] == 1)
        status, headers, text = live.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        assert status == 503 and headers["Retry-After"] == "1"
        assert json.loads(text)["error"]["type"] == "server_busy"
        first.sock.shutdown(2)
        first.close()  # the client goes away mid-stream
        second.join(10)  # ... so the one in line gets its turn
        assert not second.is_alive()
        wait_for(lambda: live.get("/health")["running"] == 0)
        stopped_at = live.get("/health")["generated_tokens"]
        time.sleep(0.3)
        assert live.get("/health")["generated_tokens"] == stopped_at  # no work goes on for nobody
        assert stopped_at < 100_000
        status, _, _ = live.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        assert status == 200


def test_showing_tokens():
    tokenizer = BPETokenizer({bytes([i]): i for i in range(256)} | {b"\xe2\x96": 256, b" a": 257})
    assert tokenizer.display(ord(" ")) == "\u2423"
    assert tokenizer.display(ord("\n")) == "\u21b5"
    assert tokenizer.display(0x07) == "\u27e8U+0007\u27e9"
    assert tokenizer.display(256) == "\u27e8e2 96\u27e9"
    assert tokenizer.display(257) == "\u2423a"
    assert tokenizer.display(tokenizer.eot_id) == "\u27e8end of text\u27e9"
    assert tokenizer.token_text(256) == "bytes:\\xe2\\x96"
    assert tokenizer.token_text(257) == " a"


@pytest.mark.slow  # a subprocess of its own: kept out of the 2-minute default suite
def test_serve_command_prints_its_url_and_stops_cleanly_on_ctrl_c_even_mid_stream(tiny_checkpoint):
    process = subprocess.Popen([sys.executable, "sample.py", "serve", str(tiny_checkpoint), "--port", "0",
                                "--device", "cpu", "--max-tokens", "1000000", "--allow-host", "box.lan"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line, line + process.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/")
        page = connection.getresponse()
        assert page.status == 200 and b"<html" in page.read()
        for host, status in (("box.lan:80", 200), ("evil.example", 421)):
            connection.request("GET", "/health", headers={"Host": host})
            answer = connection.getresponse()
            assert answer.status == status and answer.read()
        connection.request("POST", "/v1/completions", body=json.dumps({"max_tokens": 1_000_000, "stream": True}),
                           headers={"Content-Type": "application/json"})
        stream = connection.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")  # generating
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert "Traceback" not in process.stderr.read()
        connection.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()


@pytest.mark.slow
def test_serve_command_refuses_a_port_in_use_in_one_line(tiny_checkpoint):
    taken = listen("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "sample.py", "serve", str(tiny_checkpoint), "--port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and result.stderr.count("\n") == 1


def test_probabilities_sum_to_one_in_every_kept_set(server):
    status, _, text = server.post("/v1/distribution", {"prompt": "", "strategies": ["top-p:p=0.9", "min-p:p=0.2"],
                                                       "top": 200})
    assert status == 200
    for shown in json.loads(text)["strategies"]:
        assert math.fsum(c["kept_prob"] for c in shown["kept"]) == pytest.approx(1, abs=1e-9)


def test_a_strategy_spec_samples_as_the_openai_fields_do(server):
    client = server.client()
    for spec, fields in (("greedy", {"temperature": 0}), ("top-k:k=5,t=0.8", {"temperature": 0.8, "top_k": 5}),
                         ("top-p:p=0.7,rep=1.3", {"top_p": 0.7, "repetition_penalty": 1.3})):
        by_spec = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, seed=4,
                                            extra_body={"strategy": spec})
        by_fields = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, seed=4,
                                              extra_body={k: v for k, v in fields.items()})
        assert by_spec.choices[0].text == by_fields.choices[0].text, spec


@pytest.mark.parametrize(("body", "says"), [
    ({"prompt": "x", "strategy": "top-p:p=0.9", "temperature": 0.5}, "strategy and temperature are two ways"),
    ({"prompt": "x", "strategy": "greedy", "top_k": 3}, "strategy and top_k are two ways"),
    ({"prompt": "x", "strategy": "top-q:p=0.9"}, "top-p"),  # parse_strategy's suggestion
    ({"prompt": "x", "strategy": 3}, "must be a string"),
])
def test_a_bad_or_doubled_strategy_is_refused(server, body, says):
    status, _, text = server.post("/v1/completions", body)
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "strategy" and says in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_carry_each_tokens_display(server, loaded, stream):
    _, tokenizer = loaded
    status, _, text = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "seed": 2, "logprobs": 3,
                                                      "echo": True, "stream": stream})
    assert status == 200
    if stream:
        choices = [json.loads(e[6:])["choices"][0] for e in text.split("\n\n") if e and e != "data: [DONE]"]
        logprobs = {key: sum((c["logprobs"][key] for c in choices), []) for key in choices[0]["logprobs"]}
    else:
        logprobs = json.loads(text)["choices"][0]["logprobs"]
    ids = tokenizer.encode(PROMPT) + [tokenizer.encode(t)[0] for t in logprobs["tokens"][len(PROMPT):]]
    assert logprobs["display_tokens"] == [tokenizer.display(t) for t in ids]
    assert "\u2423" in logprobs["display_tokens"]  # the space of "The quick", shown
    assert logprobs["top_display"][0] is None  # the first prompt token has no context
    for top, by_text in zip(logprobs["top_display"][1:], logprobs["top_logprobs"][1:]):
        assert [c["display"] for c in top] == [tokenizer.display(c["id"]) for c in top]
        assert [(tokenizer.token_text(c["id"]), c["logprob"]) for c in top] == list(by_text.items())
    plain = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert plain.choices[0].logprobs is None  # only when asked for
