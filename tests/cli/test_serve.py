"""``vismem serve`` stops cleanly: SIGTERM (as a supervisor sends it) and Ctrl-C (SIGINT to the
whole process group, as a terminal sends it, Ray's own processes included) shut Serve and Ray
down, print one line and exit 0 or 130, with no traceback or stack dump."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from tests.conftest import free_port
from tests.index.test_memory import unit, write_embeddings


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    """A 30-vector memory of raw-pixels:4 vectors (48-d), built without Ray."""
    from encoder import Encoder
    from index.build.build import build_memory
    root = tmp_path_factory.mktemp("serve-cli")
    vectors = unit(np.random.default_rng(0).normal(size=(30, 48)))
    write_embeddings(str(root / "emb"), vectors, [str(i % 3) for i in range(30)])
    encoder = Encoder.load("raw-pixels:4")
    build_memory(str(root / "emb"), str(root / "mem"), 2, encoder={"name": encoder.name, "sha256": encoder.sha256})
    return str(root / "mem")


def wait_for_info(proc: subprocess.Popen, url: str, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vismem serve exited with {proc.returncode} before answering: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            pytest.fail(f"{url} did not answer within {timeout}s")
        time.sleep(0.5)


# (signal, to the whole group, exit code, options): the SIGTERM server is also the direct-ingress one
SIGNALS = [(signal.SIGTERM, False, 0, ["--colocate", "--ingress", "direct"]), (signal.SIGINT, True, 130, [])]


def test_serve_stops_cleanly_on_a_signal(memory):
    """SIGTERM to the process and Ctrl-C to its group, each to its own `vismem serve`; the two
    servers run side by side (each start-up is mostly waiting on Ray). The first serves with
    `--colocate --ingress direct` (the Router replica answers HTTP on --port itself, no proxy): its
    answers are the memory's own, and it stops as cleanly as the proxied one."""
    servers = []
    try:
        for signum, whole_group, code, options in SIGNALS:
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--memory", memory, "--port",
                                     str(port), *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
            servers.append((proc, port, signum, whole_group, code))
        for proc, port, signum, whole_group, _ in servers:
            wait_for_info(proc, f"http://127.0.0.1:{port}/info", timeout=240)
            assert proc.stdout.readline().startswith(f"serving {memory}: the page at http://127.0.0.1:{port}/")
        check_answers_are_the_memorys(memory, servers[0][1])
        for proc, _, signum, whole_group, _ in servers:
            if whole_group:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
        errors = [proc.communicate(timeout=120)[1] for proc, *_ in servers]
    finally:
        for proc, *_ in servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for (proc, port, signum, _, code), err in zip(servers, errors):
        check_stopped(proc, port, signum, code, err)


def check_answers_are_the_memorys(memory: str, port: int) -> None:
    """Five queries over HTTP: the ids and similarities of the memory searched in this process."""
    from index.memory import VisualMemory
    queries = unit(np.random.default_rng(1).normal(size=(5, 48)))
    body = json.dumps({"vectors": queries.tolist(), "k": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/search", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        results = json.load(response)["results"]
    found = VisualMemory.open(memory).search(queries, 4)
    assert [[n["id"] for n in r["neighbours"]] for r in results] == found.ids.tolist()
    assert np.allclose([[n["similarity"] for n in r["neighbours"]] for r in results], found.similarities, atol=1e-5)


def test_direct_ingress_is_refused_where_vismem_does_not_start_ray(memory, capsys, monkeypatch):
    """Direct ingress lives in the environment of the Ray that `vismem serve` starts: with a cluster
    address or for a written config it is refused by name, and `start` refuses it under a Ray that
    was not started for it, before deploying anything."""
    from cluster.cli import main
    from index.serve import start
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")     # --address sets it too: undone after, for the session's Ray
    assert main(["serve", "--memory", memory, "--ingress", "direct", "--address", "127.0.0.1:1"]) == 2
    assert main(["serve", "--memory", memory, "--ingress", "direct", "--config-out", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("--ingress direct is set in the environment of the Ray that vismem serve starts") == 2, err
    assert not os.path.exists("x.yaml")
    with pytest.raises(ValueError, match="direct ingress on port 8123 needs Ray started under direct_ingress_env"):
        start(memory, port=8123, ingress="direct")


def check_stopped(proc: subprocess.Popen, port: int, signum: int, code: int, err: str) -> None:
    """Exit code, one line, no traceback, the HTTP proxy gone, and every Ray process of the session gone."""
    name = signal.Signals(signum).name
    assert proc.returncode == code, err[-3000:]
    assert f"vismem serve: stopped ({name}; Serve and Ray shut down)" in err.splitlines()
    assert "Traceback" not in err and "*** SIG" not in err, err[-3000:]
    with pytest.raises(OSError):                                       # the HTTP proxy is gone
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    deadline = time.time() + 30                                        # and so are Ray's processes
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"Ray processes of the served session were still running 30 s after vismem serve exited "
                        f"({name})")
        time.sleep(0.5)
