"""cluster/ray-cluster.yaml as `ray up` reads it before it calls the cloud: Ray's own preparation and
schema (the wheel's ray-schema.json), plus EC2's RunInstances parameters for the node configs, Ray's
`ray start` options and vismem's parser for the command lines. Nothing is launched."""

import copy

import pytest

from cluster.launcher import LAUNCHER, check_launcher, load, main
from cluster.rayjob import GPU_IMAGE


@pytest.fixture(scope="module")
def config() -> dict:
    return load(LAUNCHER)


def test_the_shipped_config_is_what_ray_up_prepares(config):
    prepared = check_launcher(config)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and set(types) == {"head", "cpu", "gpu"}
    assert types["head"]["resources"] == {"CPU": 0} and types["head"]["max_workers"] == 0   # nothing runs on it
    assert types["gpu"]["resources"]["GPU"] == 1 and types["cpu"]["resources"]["CPU"] > 0
    assert sum(t.get("min_workers", 0) for t in types.values()) <= prepared["max_workers"]
    assert prepared["docker"]["image"] == GPU_IMAGE                   # the KubeRay jobs' image
    assert any(line.startswith("pip install -q -c ~/vismem/requirements.lock") for line in prepared["setup_commands"])
    assert "AWS_SECRET_ACCESS_KEY" not in str(prepared)               # credentials come from an instance profile


def refused(config, change) -> str:
    bad = copy.deepcopy(config)
    change(bad)
    with pytest.raises(ValueError) as e:
        check_launcher(bad)
    return str(e.value)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(max_worker=3), "'max_worker' was unexpected"),                       # Ray's schema
    (lambda c: c["available_node_types"]["gpu"].update(min_worker=1), "'min_worker' was unexpected"),
    (lambda c: c["available_node_types"]["cpu"].update(resources={"CPU": "16"}), "'16' is not of type 'integer'"),
    (lambda c: c["docker"].update(imag="x"), "'imag' was unexpected"),
    (lambda c: c.update(head_node_type="main"), "`head_node_type` must be one of"),          # Ray's own rules
    (lambda c: c["available_node_types"]["cpu"].update(min_workers=20), "smaller than the sum of `min_workers`"),
])
def test_rays_own_validation_refuses(config, change, message):
    assert message in refused(config, change)


def test_node_configs_are_ec2_run_instances_parameters(config):
    message = refused(config, lambda c: c["available_node_types"]["gpu"]["node_config"].update(InstanceTyp="g5.xlarge"))
    assert "available_node_types.gpu.node_config" in message and 'Unknown parameter in input: "InstanceTyp"' in message
    message = refused(config, lambda c: c["available_node_types"]["cpu"]["node_config"].update(
        BlockDeviceMappings={"DeviceName": "/dev/sda1"}))
    assert "Invalid type for parameter BlockDeviceMappings" in message


def test_command_lines_are_checked_against_ray_start_and_vismem(config):
    message = refused(config, lambda c: c["worker_start_ray_commands"].__setitem__(
        1, "ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379 --object-manager-prot=8076"))
    assert "worker_start_ray_commands[1]: ray start has no option '--object-manager-prot'" in message
    message = refused(config, lambda c: c["setup_commands"].append("vismem embed --colection s3://b/i"))
    assert "vismem refuses 'vismem embed --colection s3://b/i'" in message


def test_the_command_checks_a_file(config, tmp_path, capsys):
    assert main([]) == 0 and "ok:" in capsys.readouterr().out
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu"]["resource"] = {}
    (tmp_path / "bad.yaml").write_text(__import__("yaml").safe_dump(bad))
    assert main([str(tmp_path / "bad.yaml")]) == 2 and "'resource' was unexpected" in capsys.readouterr().out
