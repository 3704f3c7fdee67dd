"""A KubeRay ``RayService`` (``apiVersion: ray.io/v1``) serving a memory, and its strict validation.

``rayservice`` wraps a Serve config (``cluster.serve_config.serve_config``) as the RayService's
``serveConfigV2``, so a RayService and a plain cluster (``serve deploy``) serve the same app, on a
cluster of a head and an autoscaled CPU worker group. Secrets stay in Kubernetes: the editing token
is an environment variable from a secret's key (the Serve config names the variable, never the
value), object storage credentials the environment of a secret (``envFrom``), never inline.

``check_rayservice`` validates a manifest against the CRD's ``openAPIV3Schema`` of KubeRay v1.7.0
(vendored in cluster/vendor/kuberay-v1.7.0/, with its note) strictly, as kubeconform ``-strict`` does
(no unknown field anywhere but where the schema keeps fields open), then the operator's own rules that
the schema does not carry (ray-operator's validation.go: the name ≤ 47 characters of DNS-1035,
minReplicas ≤ replicas ≤ maxReplicas, a container in every pod), and its serveConfigV2 with
``cluster.serve_config.check_serve_config``.

jsonschema and the Serve schema are imported inside the functions on purpose: the CLI does not need
them to start.
"""

from __future__ import annotations

import copy
import functools
import os
import re

import yaml

from cluster.serve_config import check_serve_config

CRD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor", "kuberay-v1.7.0", "ray.io_rayservices.yaml")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 47                  # the operator's limit for a RayService's name (its services add suffixes)
RAY_VERSION = "2.60.0"
SERVE_PORT = 8000


def container(name: str, image: str, cpu: str, memory: str, env: list[dict], env_from: list[dict],
              ports: list[dict] = ()) -> dict:
    """A Ray container: requests equal to limits, the secrets' environment, Ray stopped before exit."""
    out = {"name": name, "image": image,
           "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}},
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
    env = ([{"name": "VISMEM_TOKEN", "valueFrom": {"secretKeyRef": {"name": token_secret, "key": "token"}}}]
           if token_secret else [])
    env_from = [{"secretRef": {"name": storage_secret}}] if storage_secret else []
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": SERVE_PORT, "name": "serve"}]
    low, start, high = workers
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "vismem"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},   # no replicas on the head
                    "template": {"spec": {"containers": [
                        container("ray-head", image, *head, env, env_from, ports)]}}},
                "workerGroupSpecs": [{
                    "groupName": "cpu", "replicas": start, "minReplicas": low, "maxReplicas": high,
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [container("ray-worker", image, *worker, env, env_from)]}}}],
            },
        },
    }


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


@functools.lru_cache(maxsize=1)
def strict_schema() -> dict:
    """The vendored CRD's v1 ``openAPIV3Schema``, strict below the root (the root stays open)."""
    with open(CRD) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    return {**schema, "properties": {name: strict(s) for name, s in schema["properties"].items()}}


def operator_problems(manifest: dict) -> list[str]:
    """What KubeRay's operator refuses that the CRD's schema lets through."""
    problems = []
    name = manifest.get("metadata", {}).get("name", "")
    if len(name) > MAX_NAME or not DNS_1035.match(name):
        problems.append(f"metadata.name {name!r}: at most {MAX_NAME} characters of DNS-1035 (lower-case letters, "
                        "digits and '-', starting with a letter, ending with a letter or digit)")
    cluster = manifest.get("spec", {}).get("rayClusterConfig", {})
    pods = [("headGroupSpec", cluster.get("headGroupSpec", {}))]
    for n, group in enumerate(cluster.get("workerGroupSpecs", [])):
        where = f"workerGroupSpecs[{n}] ({group.get('groupName')})"
        pods.append((where, group))
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if low > high:
            problems.append(f"{where}: minReplicas {low} > maxReplicas {high}")
        elif "replicas" in group and not low <= group["replicas"] <= high:
            problems.append(f"{where}: replicas {group['replicas']} outside [minReplicas {low}, maxReplicas {high}]")
    for where, group in pods:
        if not group.get("template", {}).get("spec", {}).get("containers"):
            problems.append(f"{where}: the pod template has no container")
    return problems


def check_rayservice(manifest: dict, build: bool = True) -> None:
    """ValueError naming every problem of a RayService manifest: the strict CRD schema, the
    operator's rules, and its serveConfigV2 as a Serve config (``build``: its app built here)."""
    import jsonschema                                  # only where a manifest is checked
    validator = jsonschema.Draft4Validator(strict_schema())
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]
    if not problems:                                   # the operator's rules read a manifest of the schema's types
        problems += operator_problems(manifest)
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != "RayService":
        problems.append("apiVersion/kind: a RayService of ray.io/v1")
    if problems:
        raise ValueError("RayService: " + "; ".join(problems))
    check_serve_config(yaml.safe_load(manifest["spec"]["serveConfigV2"]), build=build)


class BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2) as ``|`` blocks, as KubeRay's own samples do."""


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
    try:
        check_rayservice(manifest)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    text = dump(manifest)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
