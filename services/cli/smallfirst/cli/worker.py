"""`smallfirst worker --pool small|frontier|webhooks` and the liveness probe `smallfirst worker-probe`."""

from __future__ import annotations

import sys

import click

from smallfirst.common import constants as k
from smallfirst.common.runtime import heartbeat_age_s

POOLS = [k.POOL_SMALL, k.POOL_FRONTIER, k.POOL_WEBHOOKS]


@click.command()
@click.option("--pool", type=click.Choice(POOLS), required=True,
              help="Which worker pool: small (self-hosted models), frontier (escalations and frontier jobs) "
                   "or webhooks (callback deliveries).")
@click.option("--concurrency", type=int, default=None, help="Jobs in flight per process (threads).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", default=None, help="Celery node name (default: POOL@host).")
def command(pool: str, concurrency: int | None, loglevel: str, hostname: str | None) -> None:
    """Run a Celery worker of one pool, configured from SMALLFIRST_* environment variables."""
    if pool == k.POOL_SMALL:
        from smallfirst.small_worker.worker import SmallWorkerSettings
        from smallfirst.small_worker.worker import make_worker_app as make_small

        small_settings = SmallWorkerSettings()
        app = make_small(small_settings)
        threads = concurrency or small_settings.concurrency
    elif pool == k.POOL_WEBHOOKS:
        from smallfirst.common.delivery import WebhookWorkerSettings
        from smallfirst.common.delivery import make_worker_app as make_webhooks

        webhook_settings = WebhookWorkerSettings()
        app = make_webhooks(webhook_settings)
        threads = concurrency or webhook_settings.concurrency
    else:
        from smallfirst.frontier_worker.settings import FrontierWorkerSettings
        from smallfirst.frontier_worker.worker import make_worker_app as make_frontier

        frontier_settings = FrontierWorkerSettings()
        app = make_frontier(frontier_settings)
        threads = concurrency or frontier_settings.concurrency
    argv = [
        "worker", "--pool", "threads", "--concurrency", str(threads), "--loglevel", loglevel,
        "--queues", ",".join(k.POOL_QUEUES[pool]), "--hostname", hostname or f"{pool}@%h",
        # Gossip and mingle broadcast over the broker between every pair of workers: chatter that
        # grows with the pool and that nothing here uses.
        "--without-gossip", "--without-mingle",
    ]
    app.worker_main(argv)


@click.command()
@click.option("--pool", type=click.Choice(POOLS), required=True)
@click.option("--max-age-s", type=float, default=120.0, show_default=True)
def probe(pool: str, max_age_s: float) -> None:
    """Exit 0 when the pool's worker on this host beat recently (Kubernetes liveness probe)."""
    age_s = heartbeat_age_s(pool)
    if age_s is None:
        click.echo(f"no heartbeat from the {pool} worker yet", err=True)
        sys.exit(1)
    if age_s > max_age_s:
        click.echo(f"{pool} worker heartbeat is {age_s:.0f} s old (limit {max_age_s:.0f} s)", err=True)
        sys.exit(1)
    click.echo(f"{pool} worker alive (heartbeat {age_s:.1f} s ago)")
