"""The Ray cluster launcher config (cluster/ray-cluster.yaml, for ``ray up``) and its offline check.

``check_launcher`` reads a launcher config the way ``ray up`` does before it calls the cloud: Ray's
own ``prepare_config`` (merged with the provider's defaults) and ``validate_config`` (the
ray-schema.json the wheel ships, which refuses unknown keys everywhere but in ``provider`` and
``node_config``). The two open parts are checked here: every AWS ``node_config`` against EC2's
RunInstances parameters from botocore's own service model (Ray passes it to ``create_instances``),
every ``ray start`` line against the options of Ray's ``ray start`` command, and every ``vismem``
line against vismem's parser. Nothing is launched and no cloud is called.

Ray's autoscaler code, botocore and click are imported inside the functions on purpose: only a
check needs them.
"""

from __future__ import annotations

import copy
import os

import yaml

from cluster.rayjob import commands, vismem_problems

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray-cluster.yaml")
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def load(path: str = LAUNCHER) -> dict:
    """A launcher config file as a dict."""
    with open(path) as f:
        return yaml.safe_load(f)


def node_config_problems(config: dict) -> list[str]:
    """Each AWS node type's ``node_config`` as EC2 RunInstances parameters (botocore's model; Ray
    adds the instance counts), so that a misspelt or ill-typed field fails here, not at launch."""
    if config["provider"]["type"] != "aws":
        return []
    import botocore.session                # only where an AWS config is checked
    from botocore.validate import ParamValidator
    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    problems = []
    for name, node_type in config["available_node_types"].items():
        report = ParamValidator().validate({**node_type["node_config"], "MinCount": 1, "MaxCount": 1}, shape)
        if report.has_errors():
            problems.append(f"available_node_types.{name}.node_config: {report.generate_report()}")
    return problems


def ray_start_problems(line: str, where: str) -> list[str]:
    """The options of each ``ray start`` in ``line`` must be options of Ray's ``ray start``."""
    from ray.scripts.scripts import start  # Ray's CLI: only where a start line is checked
    known = {opt for param in start.params for opt in param.opts + param.secondary_opts}
    problems = []
    for argv in commands(line):
        if argv[:2] == ["ray", "start"]:
            problems += [f"{where}: ray start has no option {word.split('=')[0]!r}" for word in argv[2:]
                         if word.startswith("-") and word.split("=")[0] not in known]
    return problems


def check_launcher(config: dict) -> dict:
    """The config as ``ray up`` prepares it; ValueError naming every problem Ray's own validation,
    EC2's parameters, ``ray start`` or vismem's parser finds."""
    import jsonschema                      # Ray's validate_config raises its errors
    from ray.autoscaler._private.util import prepare_config, validate_config   # Ray: only for a check
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        raise ValueError(f"launcher config: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}") from None
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"launcher config: {e}") from None
    problems = node_config_problems(prepared)
    for key in COMMAND_KEYS:
        for n, line in enumerate(prepared.get(key) or []):
            problems += ray_start_problems(line, f"{key}[{n}]")
            problems += vismem_problems(line, f"{key}[{n}]", only_vismem=False)
    if problems:
        raise ValueError("launcher config: " + "; ".join(problems))
    return prepared


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.launcher [FILE]``: check a launcher config (default: cluster/ray-cluster.yaml)
    as ``ray up`` would read it, without launching anything."""
    import argparse                        # only when run as a command
    p = argparse.ArgumentParser(prog="python -m cluster.launcher", description=main.__doc__)
    p.add_argument("file", nargs="?", default=LAUNCHER, help="launcher config (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        prepared = check_launcher(load(args.file))
    except (ValueError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}")
        return 2
    types = prepared["available_node_types"]
    print(f"ok: {args.file}: head {prepared['head_node_type']!r}, node types "
          + ", ".join(f"{name} {t['resources']} ×{t.get('min_workers', 0)}..{t['max_workers']}"
                      for name, t in types.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
