"""The command line: help that covers every option, and one-line errors for bad input that leave
nothing behind."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cluster.cli import main, parser


def vismem(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": os.getcwd()})


def subcommands(p):
    for action in p._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in subcommands(sub))


def test_help_imports_no_torch_ray_or_faiss():
    """`vismem --help` and every parser are built without torch, Ray or FAISS (seconds a process)."""
    probe = ("import sys; from cluster.cli import parser; parser(); "
             "print(sorted(m for m in ('torch', 'ray', 'faiss', 'timm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_every_option_has_help():
    for name, sub in [("vismem", parser()), *subcommands(parser())]:
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"


def test_help_texts():
    top = vismem("--help")
    assert top.returncode == 0
    for command in ("demo", "encoder", "embed", "index", "memory", "serve", "classify", "query"):
        assert command in top.stdout
    demo = vismem("demo", "--help")
    assert demo.returncode == 0
    for option in ("--store", "--max-minutes", "--max-steps", "--preset", "--workers", "--generators", "--seed",
                   "--shards", "--port", "--fresh", "--json", "--address"):
        assert option in demo.stdout


@pytest.mark.parametrize("args, message", [
    (["embed", "--collection", "/no/such/folder", "--encoder", "raw-pixels:8", "--out", "OUT"], "/no/such/folder"),
    (["embed", "--collection", "EMPTY", "--encoder", "raw-pixels:8", "--out", "OUT"], "no images under"),
    (["embed", "--collection", "EMPTY", "--encoder", "/no/encoder", "--out", "OUT"], "no encoder checkpoint at /no/encoder"),
    (["memory", "info", "--memory", "/no/memory"], "no memory at /no/memory"),
    (["index", "build", "--embeddings", "/no/emb", "--memory", "OUT"], "no embeddings at /no/emb"),
    (["demo", "--generators", "kml,nope"], "unknown generator 'nope'"),
    (["demo", "--shards", "0"], "--shards must be positive"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "notes.txt").write_text("no images here")
    result = vismem(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "vismem" in line and "error" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "vismem-demo").exists()


def test_one_option_means_one_thing_everywhere():
    """An option spelt the same in two commands takes the same kind of value (``--workers`` is one
    number everywhere, ``-k`` one number of neighbours)."""
    seen = {}
    for name, sub in subcommands(parser()):
        for action in sub._actions:
            for option in action.option_strings:
                kind = (type(action).__name__, action.type, action.nargs)
                first = seen.setdefault(option, (name, kind))
                assert first[1] == kind, f"{option}: {first[0]} takes {first[1]}, {name} takes {kind}"
    assert seen["--workers"][1][1] is int and seen["-k"][1][1] is int and seen["--max-minutes"][1][1] is float


@pytest.mark.parametrize("args, message", [
    (["demo", "--max-minutes", "0"], "--max-minutes must be positive, got 0.0"),
    (["encoder", "train", "--generators", "shader,nope", "--out", "OUT"], "unknown generator 'nope'"),
    (["procdata", "generate", "--generator", "kml,shader", "--n", "10", "--out", "OUT"],
     "--generator takes one generator, got 'kml,shader'"),
    (["classify", "--nprobe", "0", "x.png"], "--nprobe must be positive, got 0"),
    (["index", "build", "--embeddings", "E", "--memory", "OUT", "--nprobe", "-1"], "--nprobe must be positive"),
])
def test_bad_values_fail_before_work_starts(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vismem {args[0]}: error: {message}"] or (len(err) == 1 and message in err[0]), err
    assert not (tmp_path / "OUT").exists()


def test_options_need_their_full_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--max-min", "5"])
    assert exit_.value.code == 2 and "unrecognized arguments: --max-min" in capsys.readouterr().err


@pytest.fixture
def router():
    """A stand-in router on 127.0.0.1 that records each request body and answers like the real one."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append((self.path, body))
            result = {"neighbours": [{"id": 7, "similarity": 0.9, "label": "cat", "uri": "mem://a.png", "shard": 0}]}
            if self.path == "/v1/classify":
                result.update(decision="cat", scores={"cat": 1.0})
                result["neighbours"][0]["weight"] = 1.0
            answer = json.dumps({"version": 1, "results": [result] * len(body["images"]), "partial": False,
                                 "missing_shards": [], **({"rule": body["rule"]} if "rule" in body else {})}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    server.shutdown()
    server.server_close()


def test_client_sends_nprobe_only_when_given(tmp_path, router, capsys):
    base, bodies = router
    (tmp_path / "q.png").write_bytes(b"\x89PNG not really")
    image = str(tmp_path / "q.png")
    assert main(["query", "--url", base, "-k", "3", "--nprobe", "16", image]) == 0
    assert main(["classify", "--url", base, "--k", "5", "--rule", "softmax", image]) == 0
    (path1, query), (path2, classify) = bodies
    assert path1 == "/v1/search" and query["k"] == 3 and query["nprobe"] == 16 and len(query["images"]) == 1
    assert path2 == "/v1/classify" and classify["k"] == 5 and classify["rule"] == "softmax" and "nprobe" not in classify
    assert f"{image}: cat" in capsys.readouterr().out


def test_index_build_replace_and_nprobe(tmp_path, capsys, monkeypatch):
    """--nprobe becomes the memory's default; another encoder's vectors need --replace; the
    embedding files' footers are read once per build (each is a request on S3)."""
    import index.build.build
    import index.build.parallel_add
    from index.ingest.embeddings import JOB_FILE
    from tests.index.test_memory import unit, write_embeddings
    planned = []

    def plan_files(url, read=index.build.parallel_add.plan_files):
        planned.append(url)
        return read(url)
    monkeypatch.setattr(index.build.parallel_add, "plan_files", plan_files)
    monkeypatch.setattr(index.build.build, "plan_files", plan_files)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_embeddings(str(tmp_path / name), unit(rng.normal(size=(60, 8))), ["x", "y"] * 30)
    (tmp_path / "b" / JOB_FILE).write_text(json.dumps({"encoder": "runs/other", "encoder_sha256": "def"}))
    build = ["index", "build", "--memory", str(tmp_path / "mem"), "--factory", "IVF4,Flat", "--json"]

    assert main([*build, "--embeddings", str(tmp_path / "a"), "--nprobe", "1"]) == 0
    manifest = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert manifest["version"] == 1 and manifest["search"] == {"nprobe": 1} and manifest["count"] == 60
    assert planned == [str(tmp_path / "a")]

    assert main([*build, "--embeddings", str(tmp_path / "b")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "encoder runs/other" in err[0] and "--replace" in err[0]

    assert main([*build, "--embeddings", str(tmp_path / "b"), "--replace"]) == 0
    manifest = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert manifest["version"] == 2 and manifest["encoder"]["name"] == "runs/other"


def test_embed_shows_progress_with_images_per_second(ray_local, tmp_path, capsys):
    from PIL import Image
    for i in range(12):
        (tmp_path / "images" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(tmp_path / "images" / str(i % 2) / f"{i}.png")
    args = ["embed", "--collection", str(tmp_path / "images"), "--encoder", "raw-pixels:4", "--out",
            str(tmp_path / "emb"), "--partition-size", "5", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "12/12" in captured.err and "img/s" in captured.err, captured.err
    summary = json.loads(captured.out.splitlines()[-1])
    assert summary["images"] == 12 and summary["computed"] == 3
    assert main(args) == 0                                   # nothing left to embed: no bar
    captured = capsys.readouterr()
    assert "img/s" not in captured.err and json.loads(captured.out.splitlines()[-1])["computed"] == 0


def test_the_named_cluster(monkeypatch):
    from cluster.runtime import named_cluster
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert named_cluster() is None and named_cluster("ray://head:10001") == "ray://head:10001"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert named_cluster() == "auto" and named_cluster("ray://head:10001") == "ray://head:10001"
