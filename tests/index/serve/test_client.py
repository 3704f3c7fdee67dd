"""The client's transport rules, against a real HTTP server on 127.0.0.1 scripted to misbehave:
503s are retried with backoff, reads are retried after a dropped connection, an edit is not
(it may have been applied), a refused connection is retried for everything, and every failure
names the request. The client against the real app is tested in test_serve_edits.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from index.serve.client import Client, RequestRejected, Unavailable
from tests.conftest import free_port

VERSIONS = {"current": 3, "versions": [1, 2, 3]}
ANSWERS = {"/v1/memory/versions": VERSIONS,
           "/v1/search": {"version": 3, "partial": False, "missing_shards": [], "results": [{"neighbours": []}]},
           "/v1/memory/remove": {"version": 4, "operation": "remove", "count": 2, "ids": [1, 2]}}


class Script:
    """What the server does with each request, in order: an HTTP status, or "drop" (close the
    connection without answering); past the end it answers 200 with the path's ANSWERS."""

    def __init__(self, *steps):
        self.steps, self.seen = list(steps), []


@pytest.fixture()
def server():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def respond(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            script.seen.append((self.command, self.path, self.headers.get("Authorization"), body))
            step = script.steps.pop(0) if script.steps else 200
            if step == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            data = json.dumps(ANSWERS[self.path] if step == 200 else {"detail": f"scripted {step}"}).encode()
            self.send_response(step)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = respond

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()
    httpd.server_close()


def test_a_503_is_retried_with_backoff_until_it_answers(server):
    url, script = server
    script.steps = [503, 503]
    assert Client(url, retries=3, backoff=0.01).versions().current == 3
    assert len(script.seen) == 3


def test_retries_run_out_into_unavailable_naming_the_request(server):
    url, script = server
    script.steps = [503] * 5
    with pytest.raises(Unavailable) as error:
        Client(url, retries=2, backoff=0.01).versions()
    assert error.value.status == 503 and "GET " + url + "/v1/memory/versions" in str(error.value)
    assert "scripted 503" in str(error.value) and len(script.seen) == 3


def test_a_4xx_raises_at_once_with_the_servers_words(server):
    url, script = server
    script.steps = [422]
    with pytest.raises(RequestRejected) as error:
        Client(url, retries=3, backoff=0.01).search(vectors=np.zeros((1, 4)))
    assert error.value.status == 422 and error.value.detail == "scripted 422" and len(script.seen) == 1


def test_a_dropped_search_is_retried_but_a_dropped_edit_is_not(server):
    url, script = server
    script.steps = ["drop"]
    assert Client(url, retries=2, backoff=0.01).search(vectors=np.ones((1, 4))).version == 3
    assert len(script.seen) == 2                                     # the search was sent again
    script.steps, script.seen = ["drop"], []
    with pytest.raises(Unavailable) as error:
        Client(url, token="t", retries=2, backoff=0.01).remove(ids=[4])
    assert len(script.seen) == 1 and "POST " + url + "/v1/memory/remove" in str(error.value)


def test_edits_carry_the_token_and_reads_do_not(server, monkeypatch):
    url, script = server
    monkeypatch.setenv("VISMEM_TOKEN", "from-env")
    client = Client(url)
    client.versions()
    client.remove(ids=[1, 2], reason="why")
    (_, _, read_auth, _), (method, path, edit_auth, body) = script.seen
    assert read_auth is None and edit_auth == "Bearer from-env"
    assert (method, path) == ("POST", "/v1/memory/remove") and json.loads(body) == {"ids": [1, 2], "reason": "why"}


def test_a_refused_connection_is_retried_then_unavailable():
    url = f"http://127.0.0.1:{free_port()}"                           # nothing listens there
    with pytest.raises(Unavailable) as error:
        Client(url, token="t", retries=1, backoff=0.01).add(["x"], vectors=np.zeros((1, 4)))
    assert error.value.status is None and "no answer" in str(error.value) and "/v1/memory/add" in str(error.value)


@pytest.mark.parametrize("call, message", [
    (lambda c: c.search(), "exactly one of images="),
    (lambda c: c.search(images=[b"x"], vectors=[[1.0]]), "exactly one of images="),
    (lambda c: c.search(vectors=[1.0, 2.0]), "2-d [n, dim], got shape (2,)"),
    (lambda c: c.search(images=b"one image"), "a list of images"),
    (lambda c: Client("http://x", retries=-1), "retries and backoff must be >= 0"),
])
def test_bad_arguments_fail_before_any_request(call, message):
    with pytest.raises(ValueError) as error:
        call(Client("http://127.0.0.1:9"))
    assert message in str(error.value)
