"""Build the Serve application for a memory, and start it on an HTTP port.

A replica that cannot start (a shard whose file does not match its sha256, an encoder that
changed) fails deep inside Serve, which reports only that the deployment failed; ``start`` reads
the replica's own error from ``serve.status()`` and raises it, so the user sees which shard of
which memory is wrong.
"""

from __future__ import annotations

import re

from ray import serve
from ray.serve.schema import DeploymentStatus

from index.serve.api import Limits
from index.serve.deployments import Router, ShardSearcher
from index.shard.faiss_io import check_mappable
from index.store.manifest import read_manifest


def build_app(memory_url: str, version: int | None = None, nprobe: int | None = None, shard_timeout_s: float = 10.0,
              replicas: int = 1, limits: Limits = Limits(), token_digest: str | None = None, mmap: bool = False):
    """The Serve application for the memory at ``memory_url`` (current version by default).

    ``nprobe`` is the shards' default (a request may ask for another); ``limits`` bound what one
    request may ask; ``token_digest`` (``index.serve.auth.token_digest``) is the sha256 of the
    bearer token that edits need (None: editing is off); ``mmap``: the shard replicas map their
    IVF lists from the memory's local disk instead of loading them, so a shard larger than RAM
    can answer (the replicas must run where that disk is).
    """
    if mmap:
        check_mappable(memory_url)
    manifest = read_manifest(memory_url, version)
    shards = [ShardSearcher.options(name=f"ShardSearcher-{n}", num_replicas=replicas)
              .bind(memory_url, manifest.version, n, nprobe, mmap) for n in range(len(manifest.shards))]
    return Router.bind(memory_url, manifest.version, *shards, shard_timeout_s=shard_timeout_s, limits=limits,
                       token_digest=token_digest)


def start(memory_url: str, host: str = "127.0.0.1", port: int = 8000, name: str = "vismem", route_prefix: str = "/",
          **kwargs):
    """Start Serve's HTTP proxy on ``host:port`` and deploy the app; returns the Router handle.

    ``kwargs`` go to ``build_app``. Raises ValueError with the failing replica's own message when
    a deployment cannot start (and removes the half-deployed app, unless it replaced a running one).
    """
    serve.start(http_options={"host": host, "port": port})
    replacing = name in serve.status().applications
    try:
        return serve.run(build_app(memory_url, **kwargs), name=name, route_prefix=route_prefix)
    except RuntimeError:
        failure = deployment_failure(name)
        if failure is None:
            raise
        if not replacing:
            serve.delete(name)
        raise ValueError(failure) from None


def deployment_failure(app_name: str) -> str | None:
    """The error a failed deployment of ``app_name`` died with (its last ``...Error: message`` line)."""
    app = serve.status().applications.get(app_name)
    for deployment_name, deployment in (app.deployments.items() if app else ()):
        if deployment.status == DeploymentStatus.DEPLOY_FAILED:
            errors = re.findall(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception): (.+)$", deployment.message, re.MULTILINE)
            return errors[-1] if errors else f"{deployment_name} failed to start: {deployment.message}"
    return None
