"""The one-argument builder a Serve config names (cluster.serve_app:app_builder), called the way
Ray calls it, without a cluster."""

import hashlib

import pytest
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app as serve_build

from cluster.serve_app import ServeArgs, app_builder


def deployments(app) -> dict:
    """{name: Deployment} of a bound Serve application (what Serve would deploy)."""
    return {d.name: d for d in serve_build(app, name="vismem").deployments}


def router_kwargs(app) -> dict:
    return next(d for d in serve_build(app, name="vismem").deployments if d.name == "Router").init_kwargs


def test_ray_accepts_the_builder_and_converts_the_args(memory):
    app = call_user_app_builder_with_args_if_necessary(app_builder, {"memory": memory, "replicas": 2,
                                                                     "shard_cpus": 0.5, "nprobe": 4})
    found = deployments(app)
    assert sorted(found) == ["Router", "ShardSearcher-0", "ShardSearcher-1", "ShardSearcher-2"]
    shard = found["ShardSearcher-1"]
    assert shard.num_replicas == 2 and shard.ray_actor_options["num_cpus"] == 0.5
    assert shard.init_args[0] == memory and shard.init_args[2:] == (1, 4, False)     # number, nprobe, mmap
    assert found["Router"].num_replicas == 1


def test_colocated_app_has_only_the_router(memory):
    app = app_builder({"memory": memory, "colocate": True, "limits": {"max_queries": 8}})
    assert list(deployments(app)) == ["Router"]
    kwargs = router_kwargs(app)
    assert kwargs["colocate"] == {"nprobe": None, "mmap": False} and kwargs["limits"].max_queries == 8


@pytest.mark.parametrize("args, field", [
    ({"memory": "x", "num_replicas": 2}, "num_replicas"),        # a misspelt key is refused, not dropped
    ({"memory": "x", "replicas": 0}, "replicas"),
    ({"memory": "x", "replicas": "2"}, "replicas"),              # strict: no string where a number goes
    ({"memory": "x", "shard_timeout_s": -1}, "shard_timeout_s"),
    ({"memory": "x", "limits": {"max_query": 8}}, "max_query"),
    ({"memory": "x", "token_env": "A-B"}, "token_env"),
    ({"replicas": 2}, "memory"),
])
def test_bad_args_name_the_field(args, field):
    with pytest.raises(ValidationError, match=field):
        call_user_app_builder_with_args_if_necessary(app_builder, args)
    with pytest.raises(ValidationError, match=field):          # called directly with a dict: the same check
        app_builder(args)


def test_both_token_sources_and_colocated_replicas_are_refused():
    with pytest.raises(ValidationError, match="token_file or token_env"):
        ServeArgs(memory="x", token_file="/t", token_env="T")
    with pytest.raises(ValidationError, match="replicas"):
        ServeArgs(memory="x", colocate=True, replicas=2)


def test_the_token_is_read_where_the_app_is_built_and_only_its_digest_bound(memory, tmp_path, monkeypatch):
    digest = hashlib.sha256(b"s3cret").hexdigest()
    monkeypatch.setenv("EDIT_TOKEN", " s3cret\n")
    assert router_kwargs(app_builder({"memory": memory, "token_env": "EDIT_TOKEN"}))["token_digest"] == digest
    (tmp_path / "token").write_text("s3cret\n")
    token_file = {"memory": memory, "token_file": str(tmp_path / "token")}
    assert router_kwargs(app_builder(token_file))["token_digest"] == digest
    monkeypatch.delenv("EDIT_TOKEN")
    assert router_kwargs(app_builder({"memory": memory, "token_env": "EDIT_TOKEN"}))["token_digest"] is None
    assert router_kwargs(app_builder({"memory": memory}))["token_digest"] is None
    monkeypatch.setenv("EDIT_TOKEN", "  ")
    with pytest.raises(ValueError, match="EDIT_TOKEN is empty"):
        app_builder({"memory": memory, "token_env": "EDIT_TOKEN"})
    with pytest.raises(ValueError, match="cannot read the token file"):
        app_builder({"memory": memory, "token_file": str(tmp_path / "missing")})
