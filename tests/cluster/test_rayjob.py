"""The RayJobs of training and embed+build (cluster.rayjob) against KubeRay v1.7.0's vendored RayJob
CRD, strictly, the operator's own rules, Ray's own reading of their runtime environment, and their
entrypoints as vismem commands; the shipped example manifests are what the command renders."""

import copy
import hashlib
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from cluster.kuberay import CRDS, RAY_VERSION
from cluster.rayjob import (RENDERED_BY, ROOT, WORKING_DIR, check_rayjob, commands, embed_build_job, main,
                            runtime_env, train_job)

RAYJOB_SHA256 = "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"   # kuberay v1.7.0, as published
CODE = "s3://bucket/code/vismem.zip"
SHIPPED = ["rayjob-train.yaml", "rayjob-embed-build.yaml"]


def jobs() -> dict:
    return {"train": train_job("s3://bucket/runs/enc1", CODE, gpus=3, max_minutes=90),
            "embed": embed_build_job("s3://bucket/images", "s3://bucket/runs/enc1/encoder", "s3://bucket/emb",
                                     "s3://bucket/mem", CODE, shards=6)}


def pods(manifest) -> list[dict]:
    cluster = manifest["spec"]["rayClusterSpec"]
    return [g["template"]["spec"]["containers"][0] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


def test_the_vendored_rayjob_crd_is_kuberay_v1_7_0s():
    with open(CRDS["RayJob"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == RAYJOB_SHA256


@pytest.mark.parametrize("kind", ["train", "embed"])
def test_each_job_passes_and_runs_vismem_on_gpus_with_the_code_and_secrets(kind):
    manifest = jobs()[kind]
    check_rayjob(manifest)
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == runtime_env(CODE)
    gpu = next(g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and gpu["minReplicas"] == gpu["maxReplicas"] == (3 if kind == "train" else 2)
    assert all(c["envFrom"] == [{"secretRef": {"name": "vismem-storage"}}] and "env" not in c for c in pods(manifest))
    assert all(argv[0] == "vismem" for argv in commands(spec["entrypoint"]))
    assert "value:" not in yaml.safe_dump(manifest) and "AWS_" not in yaml.safe_dump(manifest)


def test_the_entrypoints_say_what_each_job_does():
    train, embed = (commands(j["spec"]["entrypoint"]) for j in jobs().values())
    (argv,) = train
    assert argv[:3] == ["vismem", "encoder", "train"] and "--resume" in argv and "--gpus" in argv
    assert argv[argv.index("--workers") + 1] == "3" and argv[argv.index("--out") + 1] == "s3://bucket/runs/enc1"
    assert [a[:2] for a in embed] == [["vismem", "embed"], ["vismem", "index"]]
    assert embed[0][embed[0].index("--out") + 1] == embed[1][embed[1].index("--embeddings") + 1] == "s3://bucket/emb"
    assert embed[1][embed[1].index("--shards") + 1] == "6"


def test_strictness_finds_unknown_fields_the_plain_schema_allows():
    import jsonschema                                  # as cluster.kuberay does
    manifest = jobs()["embed"]
    bad = copy.deepcopy(manifest)
    bad["spec"]["shutdownAfterJobFinish"] = True
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["maxReplica"] = 3
    with open(CRDS["RayJob"]) as f:
        (v1,) = [v for v in yaml.load(f, Loader=yaml.CSafeLoader)["spec"]["versions"] if v["name"] == "v1"]
    assert not list(jsonschema.Draft4Validator(v1["schema"]["openAPIV3Schema"]).iter_errors(bad))
    with pytest.raises(ValueError) as e:
        check_rayjob(bad)
    assert "'shutdownAfterJobFinish' was unexpected" in str(e.value) and "'maxReplica' was unexpected" in str(e.value)
    bad = copy.deepcopy(manifest)
    bad["spec"]["backoffLimit"] = "2"
    with pytest.raises(ValueError, match="spec.backoffLimit: '2' is not of type 'integer'"):
        check_rayjob(bad)


def broken(change) -> dict:
    manifest = copy.deepcopy(jobs()["train"])
    change(manifest["spec"])
    return manifest


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(shutdownAfterJobFinishes=False), "ttlSecondsAfterFinished is only allowed with "
                                                         "shutdownAfterJobFinishes"),
    (lambda s: s.update(ttlSecondsAfterFinished=-1), "non-negative"),
    (lambda s: s.pop("rayClusterSpec"), "one of rayClusterSpec or clusterSelector"),
    (lambda s: s.update(clusterSelector={"ray.io/cluster": "c"}), "exclusive"),
    (lambda s: s.update(backoffLimit=-1), "backoffLimit must be non-negative"),
    (lambda s: s.update(activeDeadlineSeconds=0), "activeDeadlineSeconds must be a positive"),
    (lambda s: s.update(runtimeEnvYAML="pip: [a"), "runtimeEnvYAML is not YAML"),
    (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=4), r"minReplicas 4 > maxReplicas 3"),
    (lambda s: s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(containers=[]), "has no container"),
    (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(resources={"GPU": "1"}, rayStartParams={
        "num-gpus": "1"}), "resources given both in rayStartParams"),
])
def test_the_operators_rules_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        check_rayjob(broken(change))


@pytest.mark.parametrize("name, ok", [("a" * 47, True), ("a" * 48, False), ("Train", False), ("vismem-train-2", True)])
def test_the_name_is_at_most_47_characters_of_dns_1035(name, ok):
    manifest = train_job("s3://b/runs", CODE, name=name)
    if ok:
        check_rayjob(manifest)
    else:
        with pytest.raises(ValueError, match="at most 47 characters of DNS-1035"):
            check_rayjob(manifest)


@pytest.mark.parametrize("env, message", [
    ({"working_dir": "./vismem", "pip": []}, "not a local path"),              # the submitter pod has no checkout
    ({"working_dir": "s3://bucket/code/vismem"}, "Only .zip"),                  # Ray's own check
    ({"working_dir": CODE, "pip": {"packges": []}}, "can only have these fields"),
    ({"working_dirr": CODE}, "unknown key 'working_dirr'"),                     # Ray ignores it; we do not
])
def test_the_runtime_env_is_read_as_ray_reads_it(env, message):
    with pytest.raises(ValueError, match=message):
        check_rayjob(broken(lambda s: s.update(runtimeEnvYAML=yaml.safe_dump(env))))


@pytest.mark.parametrize("entrypoint, message", [
    ("vismem encoder train --out s3://b/r --worker 2", "vismem refuses"),      # a misspelt option
    ("vismem embed --collection s3://b/i --out s3://b/e && vismem index biuld --memory m", "vismem refuses"),
    ("python -m cluster.cli encoder train --out s3://b/r", "is not a vismem command"),
])
def test_the_entrypoint_must_be_vismem_commands_its_parser_accepts(entrypoint, message):
    with pytest.raises(ValueError, match=message):
        check_rayjob(broken(lambda s: s.update(entrypoint=entrypoint)))


def test_the_pip_lines_install_vismem_at_the_locks_versions(tmp_path):
    """The runtime env's pip packages, written as Ray writes them, with the working dir at this
    checkout: pip (offline, dry) resolves them to this environment's versions, the lock's, and would
    install only vismem itself; the lock's Ray is the image's."""
    from ray._private.runtime_env.dependency_utils import gen_requirements_txt   # how Ray writes pip's file
    requirements = str(tmp_path / "requirements.txt")
    gen_requirements_txt(requirements, runtime_env(CODE)["pip"]["packages"])
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                           "--quiet", "--report", str(report), "-r", requirements], cwd=tmp_path,
                          env={**os.environ, WORKING_DIR[2:-1]: ROOT}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]] == ["vismem"]
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        assert f"ray=={RAY_VERSION}\n" in f.readlines()


def test_the_command_writes_a_checked_manifest_and_refuses_a_bad_name(tmp_path):
    out = tmp_path / "job.yaml"
    argv = ["train", "--code", CODE, "--out", "s3://b/runs/a", "--gpus", "4", "--name", "enc-a"]
    assert main([*argv, "--out-file", str(out)]) == 0
    text = out.read_text()
    assert text.splitlines()[0] == f"# {RENDERED_BY}{shlex.join(argv)}"
    manifest = yaml.safe_load(text)
    check_rayjob(manifest)
    assert manifest["metadata"]["name"] == "enc-a" and "&" not in text      # no YAML anchors
    assert main(["train", "--code", CODE, "--out", "s3://b/r", "--name", "Enc"]) == 2
    assert main(["train", "--code", "./vismem.zip", "--out", "s3://b/r"]) == 2


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_manifests_are_what_their_command_renders(name, tmp_path):
    path = os.path.join(ROOT, "cluster", name)
    with open(path) as f:
        header = f.readline()
    assert header.startswith(f"# {RENDERED_BY}")
    assert main([*shlex.split(header.removeprefix(f"# {RENDERED_BY}")), "--out-file", str(tmp_path / name)]) == 0
    with open(path) as f:
        assert (tmp_path / name).read_text() == f.read(), f"re-render cluster/{name}: {header[2:]}"
    with open(path) as f:
        check_rayjob(yaml.safe_load(f))
