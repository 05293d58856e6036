"""`smallfirst api`: run the ingest API under uvicorn."""

from __future__ import annotations

import click
from pydantic import ValidationError

from smallfirst.api.settings import ApiSettings
from smallfirst.common import constants as k
from smallfirst.common.telemetry import configure_logging


@click.command()
@click.option("--host", default=None, help="Address to bind (default: SMALLFIRST_API_HOST or 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: SMALLFIRST_API_PORT or 8000).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="uvicorn worker processes (default: SMALLFIRST_API_WORKERS or 1).")
def command(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the ingest API (FastAPI under uvicorn)."""
    import uvicorn

    from smallfirst.api.app import create_app
    from smallfirst.api.server import server_options

    try:
        settings = ApiSettings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid settings (environment SMALLFIRST_*):\n{exc}") from exc
    # JSON lines with the trace and job ids (SMALLFIRST_LOG_JSON=false: text for a terminal).
    configure_logging(k.SERVICE_API, settings.log_level, json=settings.log_json)
    host = host or settings.api_host
    port = settings.api_port if port is None else port
    workers = workers or settings.api_workers
    common: dict[str, object] = {
        "host": host, "port": port, "log_level": settings.log_level.lower(), "access_log": settings.access_log,
        "proxy_headers": True, "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "timeout_keep_alive": settings.keep_alive_s,
        # uvicorn's own loggers then propagate to the root handler above (JSON too) instead of
        # getting uvicorn's text handlers.
        "log_config": None,
        **server_options(settings.max_header_bytes),
    }
    if workers > 1:
        # Each worker process builds its own app (and resources) from the environment.
        uvicorn.run("smallfirst.api.app:app_from_env", factory=True, workers=workers, **common)  # type: ignore[arg-type]
    else:
        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
