"""Connecting to Ray: the embedded local default, or an existing cluster.

A local Ray started here listens on 127.0.0.1 only and runs without token authentication (it is
reachable from this machine alone, and no token file is left behind). Under ``ray job submit``,
or with ``--address`` / ``RAY_ADDRESS``, the driver joins that cluster with its own settings,
token authentication included.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger("vismem.cluster")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
             configure_logging=True, logging_level=logging.WARNING, log_to_driver=True)
    log.info("started a local Ray on 127.0.0.1: %s", ray.cluster_resources())


def shutdown(ray_too: bool = True) -> None:
    """Stop Serve (if it runs) and, unless ``ray_too`` is False, Ray itself."""
    from ray import serve
    try:
        serve.shutdown()
    except Exception as e:  # noqa: BLE001 (Serve may never have started)
        log.debug("serve.shutdown: %r", e)
    if ray_too:
        ray.shutdown()
