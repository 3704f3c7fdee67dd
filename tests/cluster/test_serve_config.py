"""`vismem serve --config-out` writes a Serve config that Serve's own schema takes, with no key
Serve would drop, and whose import path and args build an app holding every deployment it names:
all offline, without a Ray cluster."""

import copy

import pytest
import yaml
from ray.serve._private.build_app import build_app as serve_build
from ray.serve.schema import ServeDeploySchema

from cluster.cli import main
from cluster.serve_app import ServeArgs
from cluster.serve_config import IMPORT_PATH, build_from, check_serve_config, serve_config, unknown_keys


@pytest.fixture(scope="module")
def written(memory, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "serve.yaml"
    assert main(["serve", "--config-out", str(path), "--memory", memory, "--replicas", "2", "--host", "0.0.0.0",
                 "--port", "8123", "--shard-timeout", "2.5"]) == 0
    return path


def test_the_written_config_is_what_serve_takes(written, memory):
    text = written.read_text()
    config = yaml.safe_load(text)
    schema = ServeDeploySchema.model_validate(config)
    assert unknown_keys(ServeDeploySchema, config) == []
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8123
    (app,) = schema.applications
    assert (app.name, app.route_prefix, app.import_path) == ("vismem", "/", IMPORT_PATH)
    assert app.args == {"memory": memory, "shard_timeout_s": 2.5, "replicas": 2, "colocate": False, "mmap": False,
                        "shard_cpus": 0.25, "limits": {}, "token_env": "VISMEM_TOKEN"}
    assert [d.name for d in app.deployments] == ["Router", "ShardSearcher-0", "ShardSearcher-1", "ShardSearcher-2"]
    assert all(d.health_check_period_s == 10 and d.health_check_timeout_s == 30 for d in app.deployments)


def test_every_deployment_the_config_names_is_in_the_app_its_args_build(written):
    (application,) = yaml.safe_load(written.read_text())["applications"]
    built = {d.name: d for d in serve_build(build_from(application), name=application["name"]).deployments}
    named = [d["name"] for d in application["deployments"]]
    assert set(named) == set(built)
    assert all(built[f"ShardSearcher-{n}"].num_replicas == 2 for n in range(3))
    router = built["Router"]
    assert router.init_args[0] == application["args"]["memory"] and router.init_kwargs["shard_timeout_s"] == 2.5


def test_the_token_is_named_never_written(memory, tmp_path, monkeypatch):
    monkeypatch.setenv("VISMEM_TOKEN", "the-secret-itself")
    (tmp_path / "token").write_text("file-secret\n")
    for extra, named in (([], {"token_env": "VISMEM_TOKEN"}), (["--token-file", str(tmp_path / "token")],
                                                                 {"token_file": str(tmp_path / "token")})):
        out = tmp_path / "serve.yaml"
        assert main(["serve", "--config-out", str(out), "--memory", memory, *extra]) == 0
        text = out.read_text()
        assert "secret" not in text.replace(str(tmp_path), "")
        args = yaml.safe_load(text)["applications"][0]["args"]
        assert {k: args[k] for k in named} == named and len({"token_env", "token_file"} & set(args)) == 1


def test_a_colocated_config_names_only_the_router(memory, tmp_path):
    out = tmp_path / "serve.yaml"
    assert main(["serve", "--config-out", str(out), "--memory", memory, "--colocate", "--json"]) == 0
    config = yaml.safe_load(out.read_text())
    assert [d["name"] for d in config["applications"][0]["deployments"]] == ["Router"]
    check_serve_config(config)


def test_unknown_keys_are_found_at_any_depth(memory):
    good = serve_config(ServeArgs(memory=memory), shards=3)
    assert ServeDeploySchema.model_validate(good) and unknown_keys(ServeDeploySchema, good) == []
    bad = copy.deepcopy(good)
    bad["http_option"] = {}
    bad["http_options"]["hots"] = "0.0.0.0"
    bad["applications"][0]["deployments"][1]["num_replica"] = 3
    bad["applications"][0]["deployments"][1]["ray_actor_options"] = {"num_cpu": 1}
    bad["applications"][0]["deployments"][2]["autoscaling_config"] = {"min_replica": 1}
    ServeDeploySchema.model_validate(bad)                  # Serve itself takes all of it, and drops it
    assert sorted(unknown_keys(ServeDeploySchema, bad)) == [
        "applications[0].deployments[1].num_replica (did you mean 'num_replicas'?)",
        "applications[0].deployments[1].ray_actor_options.num_cpu (did you mean 'num_cpus'?)",
        "applications[0].deployments[2].autoscaling_config.min_replica (did you mean 'min_replicas'?)",
        "http_option (did you mean 'http_options'?)",
        "http_options.hots (did you mean 'host'?)"]
    with pytest.raises(ValueError, match="unknown key .*num_replica"):
        check_serve_config(bad)


def test_a_bad_arg_or_a_deployment_the_app_lacks_is_refused(memory):
    config = serve_config(ServeArgs(memory=memory), shards=3)
    config["applications"][0]["args"]["replica"] = 2
    with pytest.raises(ValueError, match=r"args\.replica \(did you mean 'replicas'\?\)"):
        check_serve_config(config)
    config = serve_config(ServeArgs(memory=memory), shards=4)     # the memory has 3 shards
    with pytest.raises(ValueError, match="names deployment 'ShardSearcher-3', which its app does not have"):
        check_serve_config(config)


def test_config_out_refuses_a_missing_memory_and_writes_nothing(tmp_path):
    out = tmp_path / "serve.yaml"
    assert main(["serve", "--config-out", str(out), "--memory", str(tmp_path / "nothing")]) != 0
    assert not out.exists()
    assert main(["serve", "--config-out", str(out)]) != 0


def test_a_token_file_named_for_the_cluster_need_not_exist_where_the_config_is_written(memory, tmp_path):
    out = tmp_path / "serve.yaml"
    assert main(["serve", "--config-out", str(out), "--memory", memory, "--token-file", "/etc/vismem/token"]) == 0
    (application,) = yaml.safe_load(out.read_text())["applications"]
    assert application["args"]["token_file"] == "/etc/vismem/token"
    with pytest.raises(ValueError, match="cannot read the token file /etc/vismem/token"):
        build_from(application)                           # where the app is built, the file must be there


def test_autoscaled_shard_searchers_as_serve_deploys_them(memory, tmp_path):
    from cluster.serve_config import deployed
    out = tmp_path / "serve.yaml"
    assert main(["serve", "--config-out", str(out), "--memory", memory, "--replicas", "2", "--autoscale", "1:4"]) == 0
    config = yaml.safe_load(out.read_text())
    (application,) = config["applications"]
    router, *shards = application["deployments"]
    assert router == {"name": "Router", "num_replicas": 1, "health_check_period_s": 10.0,
                      "health_check_timeout_s": 30.0}                # one Router: never autoscaled
    assert [s["name"] for s in shards] == ["ShardSearcher-0", "ShardSearcher-1", "ShardSearcher-2"]
    assert all(s["num_replicas"] == "auto" and s["autoscaling_config"]["min_replicas"] == 1 and
               s["autoscaling_config"]["max_replicas"] == 4 for s in shards)
    check_serve_config(config)
    # the config laid over the app's code as Serve's controller does it (the code alone says 2 fixed replicas)
    app = serve_build(build_from(application), name=application["name"])
    effective = {name: info.deployment_config for name, info in deployed(application, app).items()}
    for n in range(3):
        scaling = effective[f"ShardSearcher-{n}"].autoscaling_config
        assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (1, 2, 4)
        assert scaling.target_ongoing_requests == 16 and effective[f"ShardSearcher-{n}"].num_replicas is None
    assert effective["Router"].num_replicas == 1 and effective["Router"].autoscaling_config is None
    assert all(c.health_check_period_s == 10 and c.health_check_timeout_s == 30 for c in effective.values())
    fixed = serve_config(ServeArgs(memory=memory, replicas=2), shards=3)["applications"][0]
    assert deployed(fixed, app)["ShardSearcher-0"].deployment_config.num_replicas == 2   # without: the code's


@pytest.mark.parametrize("change, message", [
    (lambda d: d["autoscaling_config"].update(min_replicas=5), "max_replicas .* must be greater than or equal"),
    (lambda d: d.update(num_replicas=3), "Manually setting num_replicas is not allowed"),
    (lambda d: d["autoscaling_config"].update(target_ongoing_request=4), "did you mean 'target_ongoing_requests'"),
    (lambda d: d.update(health_check_timeout_s=-1), "health_check_timeout_s"),
])
def test_bad_autoscaling_or_health_checks_are_refused(memory, change, message):
    config = serve_config(ServeArgs(memory=memory), shards=3, autoscale=(1, 4))
    change(config["applications"][0]["deployments"][2])
    with pytest.raises(ValueError, match=message):
        check_serve_config(config)


def test_autoscaling_needs_shard_deployments_and_a_config_file(memory, tmp_path):
    with pytest.raises(ValueError, match="colocated shards have no replicas"):
        serve_config(ServeArgs(memory=memory, colocate=True), shards=3, autoscale=(1, 2))
    assert main(["serve", "--memory", memory, "--autoscale", "1:2"]) != 0          # serving itself: fixed replicas
    with pytest.raises(SystemExit):
        main(["serve", "--config-out", str(tmp_path / "s.yaml"), "--memory", memory, "--autoscale", "3:2"])
