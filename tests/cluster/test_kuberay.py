"""The RayService manifest (cluster.kuberay) against KubeRay v1.7.0's vendored CRD, strictly, and
the operator's own rules; its serveConfigV2 is the Serve config `vismem serve --config-out` writes."""

import copy
import hashlib

import pytest
import yaml

from cluster.kuberay import CRD, check_rayservice, rayservice, strict, strict_schema
from cluster.serve_app import ServeArgs
from cluster.serve_config import serve_config

VENDORED_SHA256 = "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"   # kuberay v1.7.0, as published


@pytest.fixture(scope="module")
def config(memory):
    return serve_config(ServeArgs(memory=memory, replicas=2, token_env="VISMEM_TOKEN"), shards=3)


def test_the_vendored_crd_is_kuberay_v1_7_0s():
    with open(CRD, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == VENDORED_SHA256


def test_the_manifest_passes_the_strict_crd_schema_and_serves_the_same_config(config):
    manifest = rayservice(config, name="vismem-prod")
    check_rayservice(manifest)
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert served["applications"] == config["applications"]          # the same app as `serve deploy`
    assert served["http_options"] == {"host": "0.0.0.0", "port": 8000}
    text = yaml.safe_dump(manifest)
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "VISMEM_TOKEN", "valueFrom": {"secretKeyRef": {"name": "vismem-token", "key": "token"}}} \
        in head["env"] and head["envFrom"] == [{"secretRef": {"name": "vismem-storage"}}]
    assert "AWS_SECRET_ACCESS_KEY" not in text and "value:" not in text       # no secret value inline


def test_strictness_finds_unknown_fields_the_plain_schema_allows(config):
    import jsonschema                                  # as the module does
    manifest = rayservice(config)
    bad = copy.deepcopy(manifest)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    with open(CRD) as f:
        (v1,) = [v for v in yaml.load(f, Loader=yaml.CSafeLoader)["spec"]["versions"] if v["name"] == "v1"]
    plain = v1["schema"]["openAPIV3Schema"]
    assert not list(jsonschema.Draft4Validator(plain).iter_errors(bad))   # the CRD alone lets them through
    with pytest.raises(ValueError) as e:
        check_rayservice(bad, build=False)
    assert "'minReplica' was unexpected" in str(e.value) and "'imagePullPolcy' was unexpected" in str(e.value)
    bad = copy.deepcopy(manifest)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "3"
    with pytest.raises(ValueError, match="workerGroupSpecs.0.replicas: '3' is not of type 'integer'"):
        check_rayservice(bad, build=False)


def test_strict_keeps_open_what_the_schema_keeps_open():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"c": {}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"d": {}}}}}}
    out = strict(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["open"]
    assert out["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert out["properties"]["list"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in strict_schema()                # the root stays open


@pytest.mark.parametrize("name, ok", [("a" * 47, True), ("a" * 48, False), ("Vismem", False), ("1vismem", False),
                                      ("vismem-", False), ("vis.mem", False), ("vismem-2", True)])
def test_the_name_is_at_most_47_characters_of_dns_1035(config, name, ok):
    manifest = rayservice(config, name=name)
    if ok:
        check_rayservice(manifest, build=False)
    else:
        with pytest.raises(ValueError, match="metadata.name .*at most 47 characters of DNS-1035"):
            check_rayservice(manifest, build=False)


def test_the_operators_replica_rules_and_the_serve_config_are_checked(config):
    with pytest.raises(ValueError, match=r"minReplicas 3 > maxReplicas 2"):
        check_rayservice(rayservice(config, workers=(3, 3, 2)), build=False)
    with pytest.raises(ValueError, match=r"replicas 5 outside \[minReplicas 1, maxReplicas 4\]"):
        check_rayservice(rayservice(config, workers=(1, 5, 4)), build=False)
    manifest = rayservice(config)
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"] = []
    with pytest.raises(ValueError, match="has no container"):
        check_rayservice(manifest, build=False)
    wrong = copy.deepcopy(config)
    wrong["applications"][0]["deployments"][1]["num_replica"] = 2
    with pytest.raises(ValueError, match="unknown key .*num_replica"):
        check_rayservice(rayservice(wrong), build=False)


def test_the_command_renders_a_checked_manifest_from_a_written_config(memory, tmp_path):
    from cluster.cli import main as vismem           # the CLI, as a user runs it
    from cluster.kuberay import main
    assert vismem(["serve", "--config-out", str(tmp_path / "serve.yaml"), "--memory", memory]) == 0
    out = tmp_path / "rayservice.yaml"
    assert main(["--config", str(tmp_path / "serve.yaml"), "--image", "example.org/vismem:1", "--name", "mem-a",
                 "--out", str(out)]) == 0
    manifest = yaml.safe_load(out.read_text())
    check_rayservice(manifest)
    assert manifest["metadata"]["name"] == "mem-a"
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]["memory"] == memory
    assert main(["--config", str(tmp_path / "serve.yaml"), "--image", "x", "--name", "A" * 50]) == 2


def test_the_written_manifest_reads_back_the_same_with_the_config_as_a_block(config):
    from cluster.kuberay import dump
    manifest = rayservice(config)
    text = dump(manifest)
    assert "serveConfigV2: |" in text and yaml.safe_load(text) == manifest


def test_an_autoscaled_config_rides_in_the_rayservice(memory):
    config = serve_config(ServeArgs(memory=memory, token_env="VISMEM_TOKEN"), shards=3, autoscale=(1, 6))
    manifest = rayservice(config)
    check_rayservice(manifest)
    shards = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["deployments"][1:]
    assert [s["autoscaling_config"]["max_replicas"] for s in shards] == [6, 6, 6]
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True   # pods follow the replicas
