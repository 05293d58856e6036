"""`smallfirst frontier-sim`: run the Messages-API simulator (development and tests only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from smallfirst.common.constants import DEFAULT_FRONTIER_SIM_PORT
from smallfirst.frontier_sim.answers import AnswerSourceError
from smallfirst.frontier_sim.settings import AnswerStrategy, FrontierSimSettings

BANNER = """
************************************************************************************
*  smallfirst FRONTIER SIMULATOR - a development stand-in, NOT the Anthropic API.  *
*  Answers are scripted, echoed or looked up; they say nothing about model quality. *
*  Listening on http://{host}:{port}  (strategy: {strategy})
************************************************************************************
"""


@click.command(name="frontier-sim")
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help=f"Port (default {DEFAULT_FRONTIER_SIM_PORT}).")
@click.option("--strategy", type=click.Choice([s.value for s in AnswerStrategy]), default=None,
              help="How answers are made (default echo).")
@click.option("--fixed-answer", default=None, help="The answer of the 'fixed' strategy.")
@click.option("--script", "script_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="YAML/JSON answer script for the 'scripted' strategy.")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="CSV (text,label) for the 'oracle' strategy.")
@click.option("--api-key", default=None, help="Accept only this key (default: any non-empty key).")
@click.option("--latency-ms", type=int, default=None, help="Delay of every answer.")
@click.option("--fault-rates", default=None,
              help='JSON of fault kind -> probability, e.g. \'{"429": 0.05, "529": 0.01, "drop": 0.01}\'.')
@click.option("--fault-seed", type=int, default=None, help="Seed of the random faults.")
@click.option("--batch-processing-s", type=float, default=None,
              help="Seconds a Message Batch stays in_progress before it ends (default 5).")
def command(**options: Any) -> None:
    """Run the Messages-API simulator. Options override SMALLFIRST_FRONTIER_SIM_* variables."""
    import uvicorn

    from smallfirst.frontier_sim.app import create_app

    overrides = {key: value for key, value in options.items() if value is not None}
    if "fault_rates" in overrides:
        try:
            overrides["fault_rates"] = json.loads(overrides["fault_rates"])
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--fault-rates") from exc
    try:
        settings = FrontierSimSettings(**overrides)
        app = create_app(settings)
    except (ValidationError, AnswerSourceError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.secho(BANNER.format(host=settings.host, port=settings.port, strategy=settings.strategy.value),
                fg="yellow", bold=True, err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
