"""KubeRay ``RayJob``s (``apiVersion: ray.io/v1``) for vismem's two batch jobs: training the encoder,
and embedding a bucket then building the memory from it.

Each job brings up its own Ray cluster (a head with no Ray work on it, a GPU worker group, for the
embedding also an autoscaled CPU group for decoding and the build), runs one shell line of
``vismem`` commands as the job's entrypoint, and is torn down when it finishes
(``shutdownAfterJobFinishes``, the cluster kept ``ttlSecondsAfterFinished`` for its logs). The code
comes in the job's runtime environment: ``working_dir`` a zip of this repository at a URI every
node reads (``s3://``, ``https://``), and ``pip`` installing that working dir with every dependency
pinned by its requirements.lock (a ``-c`` constraints line), so the ``vismem`` command exists on a
plain Ray image and every node runs the same versions. Object storage credentials come from a
Kubernetes secret (``envFrom``), never inline. A failed run is retried on a fresh cluster
(``backoffLimit``): training with ``--resume`` continues from its last checkpoint, the embedding
resumes its partitions, a failed build leaves the memory's previous version current.

``check_rayjob`` validates a manifest with ``cluster.kuberay``'s machinery (the vendored CRD strict,
the operator's rules), then its runtime environment with Ray's own ``RuntimeEnv`` and its
entrypoint as ``vismem`` commands the CLI's parser accepts.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import sys

import yaml

from cluster.kuberay import (RAY_VERSION, head_group, manifest_problems, secret_env, worker_group,
                             write_checked)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"             # the head and CPU workers: Python 3.11, Ray as locked
GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"     # the GPU workers: the same with CUDA
WORKING_DIR = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"      # Ray sets it to the unpacked working_dir for pip
TTL_S = 600                                                # the finished cluster is kept 10 minutes for its logs
RENDERED_BY = "rendered by: python -m cluster.rayjob "
SIZES = {"head": ("2", "8Gi"), "cpu": ("8", "32Gi"), "gpu": ("8", "64Gi")}


def runtime_env(code: str) -> dict:
    """The job's runtime environment: ``code`` (a zip of this repository) as the working dir, installed
    with the lock's versions (pip's ``-c``; Ray's own version is the image's, which the lock equals)."""
    return {"working_dir": code,
            "pip": {"packages": [f"-c {WORKING_DIR}/requirements.lock", WORKING_DIR], "pip_check": False}}


def command(*words: str) -> str:
    """One shell command, quoted."""
    return shlex.join(str(w) for w in words)


def rayjob(name: str, entrypoint: str, code: str, gpus: int, cpu_workers: tuple[int, int, int] | None = None,
           image: str = IMAGE, gpu_image: str = GPU_IMAGE, storage_secret: str | None = "vismem-storage",
           backoff: int = 2, sizes: dict = SIZES) -> dict:
    """A RayJob running ``entrypoint`` on a cluster of its own: ``gpus`` one-GPU pods (a fixed group),
    ``cpu_workers`` (min, initial, max) CPU pods or none, the secret ``storage_secret``'s keys in
    every pod's environment (None: no secret)."""
    env, env_from = secret_env(None, storage_secret)
    groups = [worker_group("gpu", gpu_image, sizes["gpu"], (gpus, gpus, gpus), env, env_from, gpus=1)]
    if cpu_workers:
        groups.append(worker_group("cpu", image, sizes["cpu"], cpu_workers, env, env_from))
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "vismem"}},
        "spec": {
            "entrypoint": entrypoint,
            "runtimeEnvYAML": yaml.safe_dump(runtime_env(code), sort_keys=False),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_S,
            "backoffLimit": backoff,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": bool(cpu_workers),
                "headGroupSpec": head_group(image, sizes["head"], env, env_from),
                "workerGroupSpecs": groups,
            },
        },
    }


def train_job(out: str, code: str, gpus: int = 2, preset: str = "vit-s16", max_minutes: float | None = None,
              name: str = "vismem-train", **kw) -> dict:
    """The RayJob training the encoder with Ray Train on ``gpus`` GPUs (one worker each), checkpoints
    and the exported encoder under ``out``; ``--resume`` so that a retried job continues the run."""
    words = ["vismem", "encoder", "train", "--preset", preset, "--workers", gpus, "--gpus", "--out", out, "--resume"]
    if max_minutes is not None:
        words += ["--max-minutes", max_minutes]
    return rayjob(name, command(*words, "--json"), code, gpus, **kw)


def embed_build_job(collection: str, encoder: str, embeddings: str, memory: str, code: str, shards: int = 4,
                    gpus: int = 2, cpu_workers: tuple[int, int, int] = (1, 2, 8), name: str = "vismem-embed",
                    **kw) -> dict:
    """The RayJob embedding ``collection`` with ``encoder`` into ``embeddings`` (one encoder actor per
    GPU, decoding on the CPU workers), then building ``shards`` shards of ``memory`` from them."""
    embed = command("vismem", "embed", "--collection", collection, "--encoder", encoder, "--out", embeddings,
                    "--concurrency", gpus, "--json")
    build = command("vismem", "index", "build", "--embeddings", embeddings, "--memory", memory, "--shards", shards,
                    "--json")
    return rayjob(name, f"{embed} && {build}", code, gpus, cpu_workers, **kw)


def commands(line: str) -> list[list[str]]:
    """The commands of a shell line, split at ``&&``, ``||`` and ``;`` (redirections and pipes stay
    in the words of the command they follow)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out = [[]]
    for word in lexer:
        if word in ("&&", "||", ";"):
            out.append([])
        else:
            out[-1].append(word)
    return [argv for argv in out if argv]


def vismem_problems(line: str, where: str, only_vismem: bool = True) -> list[str]:
    """Each command of ``line`` must be ``vismem`` (``only_vismem``; else those that are) with
    arguments the CLI's own parser accepts; what it refuses is named with argparse's own words."""
    from cluster.cli import parser          # the CLI's parser: only where a command line is checked
    problems = []
    for argv in commands(line):
        if argv[0] != "vismem":
            if only_vismem:
                problems.append(f"{where}: {shlex.join(argv)!r} is not a vismem command")
            continue
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
                parser().parse_args(argv[1:])
        except SystemExit as e:             # argparse exits: 0 after --help, 2 after an error
            if e.code:
                problems.append(f"{where}: vismem refuses {shlex.join(argv)!r}: "
                                f"{said.getvalue().strip().splitlines()[-1]}")
    return problems


def runtime_env_problems(text: str) -> list[str]:
    """A runtimeEnvYAML as Ray reads it: ``ray.runtime_env.RuntimeEnv`` (which ignores unknown keys,
    so they are named here), and a working dir that every node can fetch (a remote URI)."""
    from ray._private.runtime_env.protocol import ProtocolsProvider   # Ray: only where a job is checked
    from ray.runtime_env import RuntimeEnv                            # Ray: only where a job is checked
    env = yaml.safe_load(text) or {}
    problems = [f"runtimeEnvYAML: unknown key {k!r}" for k in env if k not in RuntimeEnv.known_fields]
    try:
        RuntimeEnv(**{k: v for k, v in env.items() if k in RuntimeEnv.known_fields})
    except (ValueError, TypeError) as e:
        problems.append(f"runtimeEnvYAML: {e}")
    scheme = str(env.get("working_dir", "")).partition("://")[0]
    if scheme not in ProtocolsProvider.get_remote_protocols():
        problems.append(f"runtimeEnvYAML.working_dir {env.get('working_dir')!r}: a zip at a URI every node reads "
                        f"({', '.join(sorted(ProtocolsProvider.get_remote_protocols()))}), not a local path")
    return problems


def check_rayjob(manifest: dict) -> None:
    """ValueError naming every problem of a RayJob manifest: the strict CRD schema and the operator's
    rules (``cluster.kuberay``), its runtime environment as Ray reads it, its entrypoint as vismem's."""
    problems = manifest_problems(manifest, "RayJob")
    if not problems:
        spec = manifest["spec"]
        problems += runtime_env_problems(spec.get("runtimeEnvYAML", ""))
        problems += vismem_problems(spec.get("entrypoint", ""), "spec.entrypoint")
    if problems:
        raise ValueError("RayJob: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.rayjob {train,embed-build} --code URL ...``: a RayJob manifest, checked first."""
    import argparse                        # only when run as a command
    p = argparse.ArgumentParser(prog="python -m cluster.rayjob", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="job", required=True)
    train = sub.add_parser("train", help="train the encoder with Ray Train on GPUs")
    train.add_argument("--out", required=True, help="URL for checkpoints and OUT/encoder (s3://...)")
    train.add_argument("--preset", default="vit-s16", help="encoder preset (default: vit-s16)")
    train.add_argument("--max-minutes", type=float, default=None, help="time budget (default: the preset's)")
    embed = sub.add_parser("embed-build", help="embed a collection, then build the memory from it")
    embed.add_argument("--collection", required=True, help="image collection URL (s3://...)")
    embed.add_argument("--encoder", required=True, help="encoder URL (OUT/encoder of a training run)")
    embed.add_argument("--embeddings", required=True, help="URL for the embeddings")
    embed.add_argument("--memory", required=True, help="memory root URL (a new version if one exists)")
    embed.add_argument("--shards", type=int, default=4, help="shards of the memory (default: 4)")
    for s in (train, embed):
        s.add_argument("--code", required=True, help="URI of a zip of this repository every node reads "
                       "(git archive --format=zip -o vismem.zip HEAD, then upload it)")
        s.add_argument("--gpus", type=int, default=2, help="one-GPU worker pods (default: 2)")
        s.add_argument("--name", default=None, help="the RayJob's name (≤ 47 characters of DNS-1035)")
        s.add_argument("--image", default=IMAGE, help=f"head and CPU image (default: {IMAGE})")
        s.add_argument("--gpu-image", default=GPU_IMAGE, help=f"GPU image (default: {GPU_IMAGE})")
        s.add_argument("--storage-secret", default="vismem-storage", help="secret of object storage credentials")
        s.add_argument("--out-file", default=None, help="where to write the manifest (default: standard output)")
    args = p.parse_args(argv)
    kw = {"code": args.code, "gpus": args.gpus, "image": args.image, "gpu_image": args.gpu_image,
          "storage_secret": args.storage_secret, **({"name": args.name} if args.name else {})}
    manifest = (train_job(args.out, preset=args.preset, max_minutes=args.max_minutes, **kw) if args.job == "train"
                else embed_build_job(args.collection, args.encoder, args.embeddings, args.memory,
                                     shards=args.shards, **kw))
    given = list(argv if argv is not None else sys.argv[1:])
    if "--out-file" in given:                              # the header names what made the manifest, not where
        del given[given.index("--out-file"):given.index("--out-file") + 2]
    return write_checked(manifest, check_rayjob, args.out_file, header=f"# {RENDERED_BY}{shlex.join(given)}\n")


if __name__ == "__main__":
    raise SystemExit(main())
