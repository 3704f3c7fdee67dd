"""The Ray-free entry points: the one DINO loop in a single process (encoder.local), its CLI and
benchmark, eval-knn without FAISS, and the GPU check, all on the CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from encoder.config import ArchConfig, TrainConfig
from encoder.local import train_local
from encoder.runs import latest_checkpoint

TINY = TrainConfig(preset="test-tiny", arch=ArchConfig(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                   generators=("shader",), batch_size=8, local_crops=2, local_size=8, out_dim=64, head_hidden=64,
                   head_bottleneck=32, max_minutes=None, workers=1, checkpoint_every=3, log_every=1000,
                   precision="fp32")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
# Run a snippet in a fresh interpreter where `import ray` and `import faiss` fail, as on the GPU machine.
WITHOUT_RAY_AND_FAISS = "import sys; sys.modules['ray'] = None; sys.modules['faiss'] = None\n"


def weights(encoder_url: str) -> dict:
    return load_file(os.path.join(encoder_url, "weights.safetensors"))


def provenance(encoder_url: str) -> dict:
    with open(os.path.join(encoder_url, "provenance.json")) as f:
        return json.load(f)


def test_local_run_checkpoints_resumes_and_refuses_by_default(tmp_path):
    out = str(tmp_path / "run")
    first: dict = {}
    encoder = train_local(dataclasses.replace(TINY, max_steps=4), out, device="cpu", result_metrics=first)
    assert first["step"] == 4 and first["resumed_from"] is None and first["images_per_s"] > 0
    assert provenance(encoder)["steps"] == 4 and provenance(encoder)["workers"] == 1
    assert latest_checkpoint(out)[1] == 4
    assert len(os.listdir(tmp_path / "run" / "dino")) == 2          # steps 3 and 4: the newest two kept

    with pytest.raises(FileExistsError, match="--resume"):
        train_local(dataclasses.replace(TINY, max_steps=6), out, device="cpu")
    second: dict = {}
    encoder = train_local(dataclasses.replace(TINY, max_steps=6), out, resume=True, device="cpu",
                          result_metrics=second)
    assert second["resumed_from"] == 4 and second["step"] == 6 and provenance(encoder)["steps"] == 6


def test_local_and_ray_train_run_the_same_loop(ray_local, tmp_path):
    """One worker under Ray Train and one local process, same recipe and seed: the same weights,
    and a run started locally continues under Ray Train from its checkpoint."""
    from encoder.train import train
    cfg = dataclasses.replace(TINY, max_steps=3, cpus_per_worker=2)
    local = train_local(cfg, str(tmp_path / "local"), device="cpu")
    ray = train(cfg, str(tmp_path / "ray"))
    a, b = weights(local), weights(ray)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)

    metrics: dict = {}
    train(dataclasses.replace(cfg, max_steps=5), str(tmp_path / "local"), resume=True, result_metrics=metrics)
    assert metrics["resumed_from"] == 3 and metrics["step"] == 5


def test_local_bench_times_the_training_step_without_ray():
    from encoder.bench import local_train_throughput
    record = local_train_throughput("tiny-cpu", steps=5, device="cpu", batch_size=8)
    assert record["ray"] is False and record["device"] == "cpu" and record["images_per_s"] > 0
    assert 0 < record["data_share"] < 1 and record["batch_per_worker"] == 8


def test_torch_search_equals_faiss():
    from index.exact import exact_search, torch_exact_search
    rng = np.random.default_rng(0)
    memory = rng.standard_normal((3000, 24)).astype(np.float32)
    queries = rng.standard_normal((70, 24)).astype(np.float32)
    sims, ids = torch_exact_search(memory, queries, 15, device="cpu")
    faiss_sims, faiss_ids = exact_search(memory, queries, 15)
    np.testing.assert_array_equal(ids, faiss_ids)
    np.testing.assert_allclose(sims, faiss_sims, rtol=1e-5, atol=1e-5)


def run_without_ray_and_faiss(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY_AND_FAISS + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_cli_trains_benches_and_evaluates_without_ray_or_faiss(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("memory", "queries"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(6):
                base = 40 if label == "a" else 200
                Image.fromarray(np.clip(base + rng.integers(-30, 30, (20, 20, 3)), 0, 255).astype(np.uint8)).save(
                    tmp_path / split / label / f"{i}.png")
    out = tmp_path / "run"
    code = f"""
from cluster.cli import main
rc = main(["encoder", "train", "--local", "--device", "cpu", "--preset", "tiny-cpu", "--max-steps", "3",
           "--set", "batch_size=8", "--out", {str(out)!r}])
assert rc == 0, rc
rc = main(["encoder", "eval-knn", "--encoder", {str(out / 'encoder')!r}, "--memory", {str(tmp_path / 'memory')!r},
           "--queries", {str(tmp_path / 'queries')!r}, "--ks", "1,3", "--json"])
assert rc == 0, rc
rc = main(["procdata", "bench", "--device", "cpu", "--sizes", "16", "--generators", "shader", "--seconds", "0.1"])
assert rc == 0, rc
rc = main(["encoder", "bench", "--local", "--device", "cpu", "--steps", "4", "--json"])
assert rc == 0, rc
"""
    done = run_without_ray_and_faiss(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    knn = json.loads([line for line in done.stdout.splitlines() if line.startswith('{"top1"')][0])
    assert knn["top1"] == 1.0 and knn["memory_images"] == 12           # two colour classes, told apart exactly
    assert "shader" in done.stdout and '"ray": false' in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["encoder", "train", "--local", "--workers", "2", "--out", "x"], "--local trains in this one process"),
    (["encoder", "train", "--device", "cpu", "--out", "x"], "--device goes with --local"),
    (["encoder", "train", "--local", "--device", "tpu", "--out", "x"], "unknown device 'tpu'"),
    (["procdata", "bench", "--device", "cuda:7"], "device 'cuda:7'"),
    (["encoder", "bench", "--local", "--worker-counts", "1,2"], "--local times one process"),
])
def test_device_options_fail_clearly(argv, message, capsys, monkeypatch):
    from cluster.cli import main
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def fake_cifar(folder) -> str:
    """A CIFAR-10-shaped Parquet pair (JPEG bytes, string labels): two colour classes."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    rng = np.random.default_rng(0)
    folder.mkdir()
    for split, n in (("train", 40), ("test", 20)):
        images, labels = [], []
        for i in range(n):
            label = ("red", "blue")[i % 2]
            colour = np.array([200, 30, 30] if label == "red" else [30, 30, 200])
            pixels = np.clip(colour + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=75)
            images.append(buf.getvalue())
            labels.append(label)
        pq.write_table(pa.table({"image": images, "label": labels}), folder / f"{split}.parquet")
    return str(folder)


def test_gpu_check_runs_every_section_on_the_cpu_without_ray_or_faiss(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = (f"from cluster.gpu_check import main; sys.exit(main(['--tiny', '--device', 'cpu', '--out', {str(out)!r}, "
            f"'--cifar', {fake_cifar(tmp_path / 'cifar')!r}]))")
    done = run_without_ray_and_faiss(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())                 # strict JSON: no NaN
    sections = report["sections"]
    assert report["errors"] == [] and set(sections) == {"environment", "train_recipe", "cifar10_knn", "generators",
                                                        "dino_step", "data_path", "embedding", "embed_pipeline"}
    assert sections["environment"]["device"] == "cpu" and sections["environment"]["torch"]
    assert sections["train_recipe"]["steps"] == 3 and sections["train_recipe"]["data"] == "procedural only"
    knn = sections["cifar10_knn"]
    assert knn["memory_images"] == 40 and knn["results"]["raw_pixels"]["top1"] == 1.0
    assert set(knn["targets"]) == {"beats_raw_pixels", "ratio_to_random_init", "at_least_1.5x_random_init"}
    from procdata.generators import GENERATORS
    assert {r["generator"] for r in sections["generators"]["records"]} == set(GENERATORS)
    assert [r["preset"] for r in sections["dino_step"]["records"]] == ["tiny-cpu", "vit-t16", "vit-s16"]
    assert all(r["images_per_s"] > 0 for r in sections["dino_step"]["records"] + sections["embedding"]["records"])
    [data] = sections["data_path"]["records"]
    assert data["batch"] == 8 and data["stream_ms"] > 0 and data["multi_crop_ms"] > 0
    assert data["generator_share_ms"] and all(ms > 0 for ms in data["generator_share_ms"].values())
    assert "aten::" in sections["data_path"]["top_ops_by_self_cpu"] and sections["data_path"]["top_ops_by_self_device"] is None
    pipeline = sections["embed_pipeline"]["records"]
    assert [r["bench"] for r in pipeline] == ["embed_pipeline"] * 2 + ["embed_device_decode"] * 2
    assert all(r["bare_images_per_s"] > 0 and 0 < r.get("ratio_to_bare", 1) for r in pipeline)
    assert all(run["images_per_s"] > 0 for r in pipeline[:2] for run in r["loader"])


def test_gpu_check_records_a_failed_section_and_goes_on(tmp_path):
    """A section that fails (here: no CIFAR-10) is recorded with its error; the rest still run."""
    from cluster.gpu_check import Report
    report = Report(str(tmp_path / "r.json"))
    report.section("broken", lambda: 1 / 0)
    report.section("fine", lambda: {"value": float("nan")})
    data = json.loads((tmp_path / "r.json").read_text())
    assert "ZeroDivisionError" in data["sections"]["broken"]["error"]
    assert data["sections"]["fine"]["value"] is None
