"""KubeRay manifests (``apiVersion: ray.io/v1``) and their strict validation: the ``RayService``
serving a memory here, the ``RayJob``s of training and embedding in ``cluster.rayjob``, on the same
pods and checks.

``rayservice`` wraps a Serve config (``cluster.serve_config.serve_config``) as the RayService's
``serveConfigV2``, so a RayService and a plain cluster (``serve deploy``) serve the same app, on a
cluster of a head and an autoscaled CPU worker group. Secrets stay in Kubernetes: the editing token
is an environment variable from a secret's key (the Serve config names the variable, never the
value), object storage credentials the environment of a secret (``envFrom``), never inline.

``manifest_problems`` checks a manifest against its CRD's ``openAPIV3Schema`` of KubeRay v1.7.0
(vendored in cluster/vendor/kuberay-v1.7.0/, with its note) strictly, as kubeconform ``-strict`` does
(no unknown field anywhere but where the schema keeps fields open), then the operator's own rules that
the schema does not carry (ray-operator's validation.go: the name ≤ 47 characters of DNS-1035,
minReplicas ≤ replicas ≤ maxReplicas, a container in every pod, a group's resources given once);
``check_rayservice`` adds its serveConfigV2 with ``cluster.serve_config.check_serve_config``.

jsonschema and the Serve schema are imported inside the functions on purpose: the CLI does not need
them to start.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import sys

import yaml

from cluster.serve_config import check_serve_config

VENDOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor", "kuberay-v1.7.0")
CRDS = {kind: os.path.join(VENDOR, f"ray.io_{kind.lower()}s.yaml") for kind in ("RayJob", "RayService")}
CRD = CRDS["RayService"]
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 47                  # the operator's limit for a RayJob's or RayService's name (suffixes follow)
RAY_VERSION = "2.60.0"
SERVE_PORT = 8000


def container(name: str, image: str, cpu: str, memory: str, env: list[dict], env_from: list[dict],
              ports: list[dict] = (), gpus: int = 0) -> dict:
    """A Ray container: requests equal to limits (``gpus`` NVIDIA GPUs), the secrets' environment,
    Ray stopped before exit."""
    size = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    out = {"name": name, "image": image, "resources": {"requests": dict(size), "limits": dict(size)},
           "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}}}
    if env:
        out["env"] = env
    if env_from:
        out["envFrom"] = env_from
    if ports:
        out["ports"] = list(ports)
    return out


def rayservice(config: dict, name: str = "vismem", image: str = f"rayproject/ray:{RAY_VERSION}",
               token_secret: str | None = "vismem-token", storage_secret: str | None = "vismem-storage",
               workers: tuple[int, int, int] = (1, 1, 4), head: tuple[str, str] = ("2", "8Gi"),
               worker: tuple[str, str] = ("4", "16Gi")) -> dict:
    """The RayService manifest serving the Serve ``config``. ``image``: one with vismem installed
    (``pip install .``) on Ray ``RAY_VERSION``; ``token_secret``: a secret whose key ``token`` becomes
    ``$VISMEM_TOKEN`` (None: editing off); ``storage_secret``: a secret whose keys (e.g.
    ``AWS_ACCESS_KEY_ID``) become the pods' environment; ``workers``: (min, initial, max) CPU workers;
    ``head``, ``worker``: (cpu, memory) of each pod."""
    config = copy.deepcopy(config)
    config["http_options"] = {**config.get("http_options", {}), "host": "0.0.0.0", "port": SERVE_PORT}
    env, env_from = secret_env(token_secret, storage_secret)
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "vismem"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": head_group(image, head, env, env_from, [{"containerPort": SERVE_PORT,
                                                                            "name": "serve"}]),
                "workerGroupSpecs": [worker_group("cpu", image, worker, workers, env, env_from)],
            },
        },
    }


def secret_env(token_secret: str | None, storage_secret: str | None) -> tuple[list[dict], list[dict]]:
    """(env, envFrom) of the pods: ``$VISMEM_TOKEN`` from the key ``token`` of ``token_secret``,
    every key of ``storage_secret`` (e.g. ``AWS_ACCESS_KEY_ID``) as a variable; None: not used."""
    env = ([{"name": "VISMEM_TOKEN", "valueFrom": {"secretKeyRef": {"name": token_secret, "key": "token"}}}]
           if token_secret else [])
    return env, ([{"secretRef": {"name": storage_secret}}] if storage_secret else [])


def head_group(image: str, size: tuple[str, str], env: list[dict], env_from: list[dict],
               extra_ports: list[dict] = ()) -> dict:
    """The head pod's group: no Ray work on it (``num-cpus: 0``), its dashboard reachable in the cluster."""
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, *extra_ports]
    return {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": {"spec": {"containers": [container("ray-head", image, *size, env, env_from, ports)]}}}


def worker_group(name: str, image: str, size: tuple[str, str], replicas: tuple[int, int, int], env: list[dict],
                 env_from: list[dict], gpus: int = 0) -> dict:
    """An autoscaled worker group: ``replicas`` (min, initial, max) pods of ``size`` (cpu, memory)."""
    low, start, high = replicas
    return {"groupName": name, "replicas": start, "minReplicas": low, "maxReplicas": high, "rayStartParams": {},
            "template": {"spec": {"containers": [container("ray-worker", image, *size, env, env_from, gpus=gpus)]}}}


def strict(schema):
    """``schema`` with ``additionalProperties: false`` on every object schema that lists
    ``properties`` and does not keep unknown fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: (strict(value) if key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf")
                 else value) for key, value in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: strict(s) for name, s in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=2)
def strict_schema(kind: str = "RayService") -> dict:
    """The vendored CRD's v1 ``openAPIV3Schema`` of ``kind``, strict below the root (the root stays open)."""
    with open(CRDS[kind]) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    return {**schema, "properties": {name: strict(s) for name, s in schema["properties"].items()}}


def cluster_problems(cluster: dict, where: str) -> list[str]:
    """What the operator refuses in a RayCluster spec (a RayService's rayClusterConfig, a RayJob's
    rayClusterSpec) that the schema lets through."""
    problems = []
    pods = [(f"{where}.headGroupSpec", cluster.get("headGroupSpec", {}))]
    for n, group in enumerate(cluster.get("workerGroupSpecs", [])):
        at = f"{where}.workerGroupSpecs[{n}] ({group.get('groupName')})"
        pods.append((at, group))
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if low > high:
            problems.append(f"{at}: minReplicas {low} > maxReplicas {high}")
        elif "replicas" in group and not low <= group["replicas"] <= high:
            problems.append(f"{at}: replicas {group['replicas']} outside [minReplicas {low}, maxReplicas {high}]")
    for at, group in pods:
        if not group.get("template", {}).get("spec", {}).get("containers"):
            problems.append(f"{at}: the pod template has no container")
        given = {"num-cpus", "num-gpus", "memory", "resources"} & set(group.get("rayStartParams", {}))
        if given and group.get("resources"):
            problems.append(f"{at}: resources given both in rayStartParams ({sorted(given)}) and in resources")
    return problems


def job_problems(spec: dict) -> list[str]:
    """What the operator refuses in a RayJob's spec that the schema lets through."""
    problems = []
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append("spec.ttlSecondsAfterFinished must be a non-negative integer")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append("spec.ttlSecondsAfterFinished is only allowed with shutdownAfterJobFinishes: true")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append("spec.suspend needs shutdownAfterJobFinishes: true")
    if "rayClusterSpec" in spec and spec.get("clusterSelector"):
        problems.append("spec: rayClusterSpec and clusterSelector are exclusive")
    elif "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
        problems.append("spec: one of rayClusterSpec or clusterSelector must be set")
    if spec.get("activeDeadlineSeconds", 1) <= 0:
        problems.append("spec.activeDeadlineSeconds must be a positive integer")
    if spec.get("backoffLimit", 0) < 0:
        problems.append("spec.backoffLimit must be non-negative")
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    except yaml.YAMLError as e:
        problems.append(f"spec.runtimeEnvYAML is not YAML: {e}")
    else:
        if not isinstance(env, dict):
            problems.append("spec.runtimeEnvYAML must be a YAML mapping")
    if "rayClusterSpec" in spec:
        problems += cluster_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
    return problems


def operator_problems(manifest: dict) -> list[str]:
    """What KubeRay's operator refuses that the CRD's schema lets through (a RayService or a RayJob)."""
    problems = []
    name = manifest.get("metadata", {}).get("name", "")
    if len(name) > MAX_NAME or not DNS_1035.match(name):
        problems.append(f"metadata.name {name!r}: at most {MAX_NAME} characters of DNS-1035 (lower-case letters, "
                        "digits and '-', starting with a letter, ending with a letter or digit)")
    spec = manifest.get("spec", {})
    if manifest.get("kind") == "RayJob":
        return problems + job_problems(spec)
    return problems + cluster_problems(spec.get("rayClusterConfig", {}), "spec.rayClusterConfig")


def manifest_problems(manifest: dict, kind: str) -> list[str]:
    """Every problem of a ``kind`` (RayJob, RayService) manifest: the strict CRD schema, then the
    operator's rules."""
    import jsonschema                                  # only where a manifest is checked
    validator = jsonschema.Draft4Validator(strict_schema(kind))
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]
    if not problems:                                   # the operator's rules read a manifest of the schema's types
        problems += operator_problems(manifest)
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != kind:
        problems.append(f"apiVersion/kind: a {kind} of ray.io/v1")
    return problems


def check_rayservice(manifest: dict, build: bool = True) -> None:
    """ValueError naming every problem of a RayService manifest: the strict CRD schema, the
    operator's rules, and its serveConfigV2 as a Serve config (``build``: its app built here)."""
    problems = manifest_problems(manifest, "RayService")
    if problems:
        raise ValueError("RayService: " + "; ".join(problems))
    check_serve_config(yaml.safe_load(manifest["spec"]["serveConfigV2"]), build=build)


class BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2, runtimeEnvYAML) as ``|`` blocks, as KubeRay's own samples
    do, and what pods share (the secrets' environment) in full each time, without YAML anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def dump(manifest: dict) -> str:
    """The manifest as YAML for ``kubectl apply -f``."""
    return yaml.dump(manifest, Dumper=BlockDumper, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.kuberay --config serve.yaml --image IMAGE [--name N] [--out rayservice.yaml]``:
    the RayService serving a Serve config that ``vismem serve --config-out`` wrote, checked first."""
    import argparse                        # only when run as a command
    p = argparse.ArgumentParser(prog="python -m cluster.kuberay", description=main.__doc__)
    p.add_argument("--config", required=True, help="a Serve config file (vismem serve --config-out)")
    p.add_argument("--image", required=True, help=f"a container image with vismem installed on Ray {RAY_VERSION}")
    p.add_argument("--name", default="vismem", help="the RayService's name (≤ 47 characters of DNS-1035)")
    p.add_argument("--token-secret", default="vismem-token", help="secret whose key 'token' is $VISMEM_TOKEN")
    p.add_argument("--storage-secret", default="vismem-storage", help="secret of object storage credentials")
    p.add_argument("--out", default=None, help="where to write the manifest (default: standard output)")
    args = p.parse_args(argv)
    with open(args.config) as f:
        config = yaml.safe_load(f)
    manifest = rayservice(config, name=args.name, image=args.image, token_secret=args.token_secret,
                          storage_secret=args.storage_secret)
    return write_checked(manifest, check_rayservice, args.out)


def write_checked(manifest: dict, check, out: str | None, header: str = "") -> int:
    """``check`` the manifest, then write ``header`` and its YAML to ``out`` (standard output when
    None); a manifest that fails its check is not written, and the error goes to standard error."""
    try:
        check(manifest)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = header + dump(manifest)
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
