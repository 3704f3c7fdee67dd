"""Connecting to Ray: the embedded local default, or an existing cluster.

A local Ray started here listens on 127.0.0.1 only and runs without token authentication (it is
reachable from this machine alone, and no token file is left behind). Under ``ray job submit``,
or with ``--address`` / ``RAY_ADDRESS``, the driver joins that cluster with its own settings,
token authentication included.

Ray reads its bind setting when it is first imported, so this module imports ray only inside
functions, and ``loopback_only()`` runs before anything imports ray (the CLI and the tests do).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

log = logging.getLogger("vismem.cluster")


def named_cluster(address: str | None = None) -> str | None:
    """The Ray cluster to join: ``address`` (``--address``), else RAY_ADDRESS; None for a local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def loopback_only(address: str | None = None) -> None:
    """Make a local Ray bind 127.0.0.1; a no-op when joining a cluster (``address``/RAY_ADDRESS)."""
    if address:
        os.environ["RAY_ADDRESS"] = address
    if not named_cluster():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    loopback_only(address)
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    address = named_cluster()
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
        return
    if ray_constants.ENABLE_RAY_CLUSTER:
        log.warning("ray was imported before cluster.runtime.loopback_only(): the local Ray will listen on "
                    "every interface, not only 127.0.0.1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=True)
    log.info("started a local Ray on 127.0.0.1: %s", ray.cluster_resources())


def shutdown(ray_too: bool = True, serve_too: bool = False) -> None:
    """Stop Serve (when ``serve_too``) and, unless ``ray_too`` is False, Ray itself."""
    import ray
    from ray import serve

    if serve_too and ray.is_initialized():
        try:
            serve.shutdown()
        except Exception as e:  # noqa: BLE001 (Serve may never have started)
            log.debug("serve.shutdown: %r", e)
    if ray_too:
        ray.shutdown()


@contextmanager
def ray_session(address: str | None = None, serve_too: bool = False):
    """Ray for the length of a ``with`` block: started (or joined) on entry, shut down on exit,
    unless the caller had already connected (then it stays as it was)."""
    import ray
    owned = not ray.is_initialized()
    init_ray(address)
    try:
        yield
    finally:
        if owned:
            shutdown(serve_too=serve_too)
