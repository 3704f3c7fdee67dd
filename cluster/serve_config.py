"""A Ray Serve config file for a memory (``vismem serve --config-out serve.yaml``): what ``serve run
serve.yaml``, ``serve deploy serve.yaml`` and a KubeRay RayService's ``serveConfigV2`` take.

The config names ``cluster.serve_app:app_builder`` with the memory's ``ServeArgs`` and one entry per
deployment the app has (the Router, and a ``ShardSearcher-N`` per shard unless colocated) with
their health checks and, if asked, Serve autoscaling of each shard's searchers between a minimum
and a maximum of replicas, so an operator tunes them in the file. It is checked before it is
written: with Serve's own ``ServeDeploySchema``; for unknown keys, which Serve's models drop
silently (a misspelt ``num_replica:`` would pass and do nothing), by ``unknown_keys`` against the
models' fields; by building the app from the config's import path and args (no cluster needed) to
see that every deployment it names exists; and by laying the config's deployment options over the
built app's with Serve's own ``override_deployment_info``, as Serve's controller does on deploy.

Ray and the builder (FAISS, FastAPI) are imported inside the functions on purpose: the CLI imports
this module for ``--config-out`` only.
"""

from __future__ import annotations

import difflib
import importlib
import types
import typing

import yaml

IMPORT_PATH = "cluster.serve_app:app_builder"
HEALTH_CHECK = {"health_check_period_s": 10.0, "health_check_timeout_s": 30.0}
# Each query is one request to every shard; a replica batches 16 of them per FAISS search.
AUTOSCALING = {"target_ongoing_requests": 16, "upscale_delay_s": 30.0, "downscale_delay_s": 300.0}


def shard_entry(n: int, args, autoscale: tuple[int, int] | None) -> dict:
    """The config's entry for ShardSearcher-``n``: health checks, and Serve autoscaling between
    ``autoscale`` (min, max) replicas starting at ``args.replicas`` (clamped), or None: the code's
    fixed ``args.replicas``."""
    entry = {"name": f"ShardSearcher-{n}", **HEALTH_CHECK}
    if autoscale:
        low, high = autoscale
        entry.update(num_replicas="auto", autoscaling_config={     # "auto": Serve's defaults under these
            "min_replicas": low, "initial_replicas": min(max(args.replicas, low), high), "max_replicas": high,
            **AUTOSCALING})
    return entry


def serve_config(args, shards: int, name: str = "vismem", route_prefix: str = "/", host: str = "0.0.0.0",
                 port: int = 8000, autoscale: tuple[int, int] | None = None) -> dict:
    """The Serve config (a dict) serving ``args`` (``cluster.serve_app.ServeArgs``) of a memory of
    ``shards`` shards: HTTP on ``host:port``, the app at ``route_prefix``; ``autoscale``: (min, max)
    replicas of each shard's searchers, autoscaled by Serve."""
    if autoscale and args.colocate:
        raise ValueError("autoscale: colocated shards have no replicas of their own to scale")
    deployments = [{"name": "Router", "num_replicas": 1, **HEALTH_CHECK}]     # one Router: the memory's one writer
    if not args.colocate:
        deployments += [shard_entry(n, args, autoscale) for n in range(shards)]
    return {"proxy_location": "EveryNode",
            "http_options": {"host": host, "port": port},
            "applications": [{"name": name, "route_prefix": route_prefix, "import_path": IMPORT_PATH,
                              "args": args.model_dump(mode="json", exclude_none=True),
                              "deployments": deployments}]}


def models_in(annotation) -> tuple[list, list, list]:
    """The pydantic models, list item types and dict value types an annotation admits."""
    from pydantic import BaseModel          # with Serve's schema only: lazy as the rest
    models, items, values = [], [], []
    origin, parts = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        models.append(annotation)
    elif origin is typing.Annotated:
        return models_in(parts[0])
    elif origin in (typing.Union, types.UnionType):
        for part in parts:
            found = models_in(part)
            models, items, values = models + found[0], items + found[1], values + found[2]
    elif origin in (list, tuple, set) and parts:
        items.append(parts[0])
    elif origin is dict and len(parts) == 2:
        values.append(parts[1])
    return models, items, values


def unknown_keys(model, data, path: str = "") -> list[str]:
    """Every key of ``data`` (nested dicts and lists included) that ``model``'s fields do not name,
    as ``path.key`` with the nearest field name if one is close."""
    if not isinstance(data, dict):
        return []
    known = {}
    for field_name, field in model.model_fields.items():
        known[field_name] = field
        if field.alias:
            known[field.alias] = field
    problems = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            problems.append(where + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        problems += unknown_keys_as(known[key].annotation, value, where)
    return problems


def unknown_keys_as(annotation, value, where: str) -> list[str]:
    """``unknown_keys`` of ``value`` read as ``annotation`` (a model, a list or dict of them, a union)."""
    models, items, values = models_in(annotation)
    if isinstance(value, dict) and models:
        return unknown_keys(models[0], value, where)
    if isinstance(value, dict) and values:
        return [p for k, v in value.items() for p in unknown_keys_as(values[0], v, f"{where}.{k}")]
    if isinstance(value, list) and items:
        return [p for n, v in enumerate(value) for p in unknown_keys_as(items[0], v, f"{where}[{n}]")]
    return []


def build_from(application: dict, token: bool = True):
    """The Serve application a config's application entry builds (its import path called with its
    args; without ``token``, vismem's args lose their token source: a token file named for the
    cluster need not exist here, and no deployment depends on it)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary   # Ray: lazy
    module, _, attr = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    args = dict(application.get("args") or {})
    if not token and application["import_path"] == IMPORT_PATH:
        args.pop("token_file", None), args.pop("token_env", None)
    return call_user_app_builder_with_args_if_necessary(builder, args)


def deployed(application: dict, app) -> dict:
    """{name: DeploymentInfo} of the built ``app`` with the config ``application``'s deployment
    options laid over the code's by Serve's own ``override_deployment_info``, as its controller does."""
    from ray.serve._private.application_state import override_deployment_info   # Ray: lazy
    from ray.serve._private.config import ReplicaConfig                          # Ray: lazy
    from ray.serve._private.deployment_info import DeploymentInfo                # Ray: lazy
    from ray.serve.schema import ServeApplicationSchema                          # Ray: lazy
    infos = {d.name: DeploymentInfo(         # the replica configs as the controller receives them: serialized
        deployment_config=d._deployment_config, start_time_ms=0, deployer_job_id="offline",
        replica_config=ReplicaConfig.from_proto_bytes(d._replica_config.to_proto_bytes(),
                                                      d._deployment_config.needs_pickle()))
        for d in app.deployments}
    return override_deployment_info(infos, ServeApplicationSchema.model_validate(application))


def check_serve_config(config: dict, build: bool = True):
    """``config`` as Serve's ``ServeDeploySchema``; ValueError naming every unknown key, bad arg, and
    (``build``: the app built from each application's import path and args, here, without the
    token) every deployment the config names that the app does not have, or whose options Serve
    cannot lay over the code's."""
    from ray.serve._private.build_app import build_app as serve_build    # Ray: lazy
    from ray.serve.schema import ServeDeploySchema                       # Ray: lazy

    from cluster.serve_app import ServeArgs                              # FAISS, FastAPI: lazy
    schema = ServeDeploySchema.model_validate(config)
    problems = [f"unknown key {p}" for p in unknown_keys(ServeDeploySchema, config)]
    for n, application in enumerate(config["applications"]):
        if application["import_path"] == IMPORT_PATH:
            problems += [f"unknown key applications[{n}].args.{p}"
                         for p in unknown_keys(ServeArgs, application.get("args") or {})]
        if build and not problems:
            app = serve_build(build_from(application, token=False), name=application["name"])
            built = {d.name for d in app.deployments}
            problems += [f"applications[{n}] ({application['name']}) names deployment {d['name']!r}, which its "
                         f"app does not have (it has {sorted(built)})"
                         for d in application.get("deployments", []) if d["name"] not in built]
            if not problems:
                try:
                    deployed(application, app)
                except (ValueError, TypeError) as e:             # pydantic's ValidationError is a ValueError
                    problems.append(f"applications[{n}] ({application['name']}): {e}")
    if problems:
        raise ValueError("Serve config: " + "; ".join(problems))
    return schema


def write_serve_config(path: str, config: dict) -> None:
    """``config`` as YAML at ``path`` (any fsspec URL), checked first (``check_serve_config``)."""
    import fsspec                          # s3fs and friends: only when a file is written
    check_serve_config(config)
    text = ("# Ray Serve config for vismem: `serve run` / `serve deploy` this file (written by vismem serve "
            "--config-out)\n" + yaml.safe_dump(config, sort_keys=False))
    with fsspec.open(path, "w") as f:
        f.write(text)
