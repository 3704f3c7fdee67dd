"""Shared fixtures: a real S3 endpoint (moto_server on 127.0.0.1) and a real local Ray."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from cluster.runtime import loopback_only

loopback_only()          # before anything imports ray: the tests' Ray listens on 127.0.0.1 only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; s3fs (in this process and in Ray workers) is pointed at it
    through fsspec's FSSPEC_S3_* environment configuration."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: install the project's dev extra (make setup)")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config
    fsspec.config.conf.clear()
    fsspec.config.set_conf_env(fsspec.config.conf)
    yield endpoint
    proc.terminate()
    proc.wait(10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fsspec.config.conf.clear()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray (127.0.0.1, 2 CPUs) for the session; started after the S3 endpoint so that
    its workers inherit the endpoint configuration."""
    import ray

    from cluster.runtime import init_ray
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; returns its s3:// URL."""
    import uuid

    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"
