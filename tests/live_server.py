"""A live server for the tests: a uvicorn running an app in a thread, on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import threading
import time

import openai
import uvicorn

from model.serve import listen, uvicorn_config


class LiveServer:
    """A uvicorn server running an app in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app, access_log: bool = False):
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, access_log=access_log, graceful_shutdown_s=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30)

    def post(self, path: str, body: bytes | dict, headers: dict[str, str] | None = None,
             method: str = "POST") -> tuple[int, http.client.HTTPMessage, str]:
        """Status, headers and body text of one request (a JSON POST unless told otherwise)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.headers, response.read().decode(errors="replace")
        finally:
            connection.close()

    def get(self, path: str) -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", path)
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()
