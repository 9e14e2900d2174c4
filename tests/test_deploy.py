"""The deployment examples of the README's "Scaling out" (deploy/) run commands the CLI takes:
every ``image-runner`` command line in the compose file, the Kubernetes Job and the Slurm array
parses, names the same run (state and output) as the others, and keeps every secret out of its
command line (they come from the environment)."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from runner.cli.parser import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def compose_commands() -> dict[str, list[str]]:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return {
        name: service["command"]
        for name, service in doc["services"].items()
        if isinstance(service.get("command"), list)
    }


def test_every_command_of_the_examples_parses() -> None:
    parser = build_parser()
    commands = list(compose_commands().values())
    job = yaml.safe_load((DEPLOY / "k8s-job.yaml").read_text())
    commands.append(job["spec"]["template"]["spec"]["containers"][0]["args"])
    script = (DEPLOY / "slurm-array.sh").read_text().replace("\\\n", " ")
    line = next(text for text in script.splitlines() if text.startswith("exec image-runner"))
    commands.append(shlex.split(line)[2:])
    for command in commands:
        args = parser.parse_args(command)
        assert args.command in {"run", "work", "emulate"}, command
        if args.command != "emulate":
            assert args.state.startswith("postgresql://"), command
            assert ":" not in args.state.split("//", 1)[1].split("@")[0]  # no password in it


def test_the_compose_file_plans_and_works_one_run() -> None:
    parser = build_parser()
    commands = compose_commands()
    plan, work = parser.parse_args(commands["plan"]), parser.parse_args(commands["worker"])
    assert plan.command == "run" and work.command == "work"
    assert (plan.state, str(plan.out), plan.base_url) == (work.state, str(work.out), work.base_url)
