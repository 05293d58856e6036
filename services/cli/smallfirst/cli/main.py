"""The `smallfirst` command. Each service contributes its own subcommands from its `cli` module.

Subcommands are imported only when they run, so `smallfirst submit` does not pay for importing
vLLM and the API image, which has no vLLM, can still run `smallfirst api`.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

# command name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "dev": "smallfirst.cli.dev:command",
    "submit": "smallfirst.cli.client:submit",
    "get": "smallfirst.cli.client:get",
    "dead-letters": "smallfirst.cli.deadletters:command",
    "tenant": "smallfirst.cli.tenants:command",
    "api": "smallfirst.api.cli:command",
    "worker": "smallfirst.cli.worker:command",
    "worker-probe": "smallfirst.cli.worker:probe",
    "inference": "smallfirst.inference.cli:command",
    "make-tiny-model": "smallfirst.inference.cli:make_tiny_model",
    "frontier-sim": "smallfirst.frontier_sim.cli:command",
    "model": "smallfirst.cli.learning:model_command",
    "examples": "smallfirst.cli.learning:examples_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        command: Any = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=LazyGroup)
def cli() -> None:
    """smallfirst: route each LLM job to the smallest model that gets it done."""


def main() -> None:
    cli()
