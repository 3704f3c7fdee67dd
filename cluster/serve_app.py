"""The Serve application as a config file names it: ``import_path: cluster.serve_app:app_builder``.

Ray Serve's config (``serve run serve.yaml``, ``serve deploy``, a KubeRay RayService's
``serveConfigV2``) names an application builder that takes exactly one argument, the config's
``args``; ``app_builder`` takes them as ``ServeArgs`` (Ray validates the dict into the model it is
annotated with) and calls ``index.serve.build_app``. An unknown or ill-typed argument is an error
naming the field, never silently dropped.

The editing token never appears in a config: ``args`` name where the process that builds the app
finds it (``token_file``, or the environment variable ``token_env``, e.g. from a Kubernetes
secret); only its sha256 reaches the Router, as with ``vismem serve``.
"""

import logging
from dataclasses import fields

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from index.serve.api import Limits
from index.serve.auth import token_digest
from index.serve.deployments import build_app

log = logging.getLogger("vismem.cluster.serve_app")
LIMIT_NAMES = tuple(f.name for f in fields(Limits))


class ServeArgs(BaseModel):
    """The ``args`` of vismem's application in a Serve config; each maps to ``build_app``'s own."""

    model_config = ConfigDict(extra="forbid", strict=True)

    memory: str = Field(min_length=1, description="memory root URL, readable from every node")
    version: int | None = Field(None, ge=0, description="memory version to serve (default: the current one)")
    nprobe: int | None = Field(None, ge=1, description="the shards' default IVF lists to visit")
    shard_timeout_s: float = Field(10.0, gt=0, description="seconds before a shard counts as failed")
    replicas: int = Field(1, ge=1, description="replicas per shard searcher")
    colocate: bool = Field(False, description="hold every shard in the Router's process")
    mmap: bool = Field(False, description="memory-map the shards' IVF lists from the memory's local disk")
    shard_cpus: float = Field(0.25, ge=0, description="Ray CPUs reserved per shard replica")
    limits: dict[str, int] = Field(default_factory=dict, description="index.serve.Limits fields to change")
    token_file: str | None = Field(None, min_length=1, description="file holding the editing token")
    token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                  description="environment variable holding the editing token")

    @field_validator("limits")
    @classmethod
    def known_limits(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(LIMIT_NAMES))
        if unknown:
            raise ValueError(f"unknown limits {unknown}: the limits are {list(LIMIT_NAMES)}")
        bad = sorted(name for name, v in value.items() if v < 1)
        if bad:
            raise ValueError(f"limits {bad} must be at least 1")
        return value

    @model_validator(mode="after")
    def one_token_source(self) -> "ServeArgs":
        if self.token_file and self.token_env:
            raise ValueError("give token_file or token_env, not both")
        if self.colocate and self.replicas != 1:
            raise ValueError(f"replicas: colocated shards have no replicas of their own (asked for {self.replicas})")
        return self

    def digest(self) -> str | None:
        """The sha256 of the editing token where the args say to find it (None: editing off)."""
        if self.token_file:
            return token_digest(self.token_file)
        if self.token_env is None:
            return None
        digest = token_digest(env=self.token_env)
        if digest is None:
            log.warning("$%s is not set where the app is built: editing over HTTP is off", self.token_env)
        return digest


def app_builder(args: ServeArgs):
    """The Serve application for a config's ``args`` (a dict or ServeArgs): ``index.serve.build_app``."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    return build_app(args.memory, version=args.version, nprobe=args.nprobe, shard_timeout_s=args.shard_timeout_s,
                     replicas=args.replicas, limits=Limits(**args.limits), token_digest=args.digest(),
                     mmap=args.mmap, colocate=args.colocate, shard_cpus=args.shard_cpus)
