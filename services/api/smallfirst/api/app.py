"""The ingest API: `create_app(settings)` builds the FastAPI app; its lifespan opens every resource.

Routes are thin: they authenticate, parse, and delegate to the `JobService` built once in the
lifespan. Errors of every kind leave in one shape (see errors.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import anyio
import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from smallfirst.api.auth import Authenticator
from smallfirst.api.callbacks import CallbackChecker
from smallfirst.api.commit import GroupCommitter
from smallfirst.api.dashboard.routes import PREFIX as DASHBOARD_PREFIX
from smallfirst.api.dashboard.routes import STATIC_DIR, Dashboard
from smallfirst.api.dashboard.routes import router as dashboard_router
from smallfirst.api.dashboard.views import DashboardViews, StoredDeadLetters
from smallfirst.api.deadletters import DeadLetterQuery, DeadLetterService
from smallfirst.api.errors import ApiError, error_body, install_error_handlers, json_bytes, json_response
from smallfirst.api.events import JobEventHub
from smallfirst.api.idempotency import REPLAYED_HEADER, IdempotencyStore, Receipt, StoredResponse, fingerprint
from smallfirst.api.learning import FeedbackRequest, Learning, StoredLearning
from smallfirst.api.limits import BodySizeLimit
from smallfirst.api.metrics import ApiMetrics
from smallfirst.api.models import (
    BatchRequest,
    BatchResponse,
    BulkReplayRequest,
    BulkReplayResponse,
    DeadLetterList,
    ErrorResponse,
    Health,
    JobList,
    JobRequest,
    JobResource,
    ReplayRequest,
    StatsResponse,
    TaskList,
)
from smallfirst.api.publishing import PublishPump
from smallfirst.api.quota import QuotaLimiter
from smallfirst.api.service import JobService, ListQuery
from smallfirst.api.settings import ApiSettings
from smallfirst.api.stats import StatsReader
from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.catalog import Catalog, CatalogError, load_catalog
from smallfirst.common.fair import FairQueues
from smallfirst.common.jobs import JobStatus, Tier
from smallfirst.common.queues import Publisher, make_celery
from smallfirst.common.store import AsyncJobStore, JobStore
from smallfirst.common.tenants import AsyncTenantRegistry, Tenant

log = logging.getLogger(__name__)

BATCH_PATH = "/v1/jobs/batch"
_READY_PING_TIMEOUT_S = 2.0

DESCRIPTION = """
Submit LLM jobs; smallfirst runs each on the smallest model that gets it done: a self-hosted small
model first, the frontier model when the small answer fails validation or the job needs it.

Authenticate with `Authorization: Bearer <API key>`. Every error has the shape
`{"error": {"code", "message", "details"}}`. POST requests accept an `Idempotency-Key` header:
a repeat returns the first response (with `Idempotent-Replayed: true`).
"""


SECURITY_SCHEME = "ApiKey"
# Declared per route rather than through a FastAPI security dependency: one dependency level less
# on every request is a measurable share of a submission's cost (see bench/ingest.py).
AUTHENTICATED: dict[str, Any] = {"security": [{SECURITY_SCHEME: []}]}


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def _authenticated(*statuses: int) -> dict[str, Any]:
    """Route options of an endpoint that needs an API key and may also answer `statuses`."""
    return {"responses": _error_responses(401, *statuses), "openapi_extra": AUTHENTICATED}


@dataclass
class Runtime:
    """Everything the routes use, built once by the lifespan."""

    settings: ApiSettings
    catalog: Catalog
    redis: aioredis.Redis
    service: JobService
    auth: Authenticator
    idempotency: IdempotencyStore
    hub: JobEventHub
    pump: PublishPump
    metrics: ApiMetrics
    learning: Learning
    dead_letters: DeadLetterService


def runtime(request: Request) -> Runtime:
    state: Runtime = request.app.state.runtime
    return state


async def current_tenant(request: Request) -> Tenant:
    return await runtime(request).auth.authenticate(request.headers.get("authorization"))


TenantDep = Annotated[Tenant, Depends(current_tenant)]
IdempotencyKey = Annotated[str | None, Header(
    alias=k.HEADER_IDEMPOTENCY_KEY,
    description="Makes the request safe to retry: a repeat with the same key returns the first response.")]


def _send(stored: StoredResponse) -> Response:
    headers = {REPLAYED_HEADER: "true"} if stored.replayed else {}
    return Response(content=stored.body, status_code=stored.status, media_type="application/json", headers=headers)


async def _idempotent(request: Request, tenant: Tenant, key: str | None, payload: Any,
                      handle: Callable[[Receipt], Awaitable[StoredResponse]]) -> Response:
    rt = runtime(request)
    request_fingerprint = fingerprint(request.method, request.url.path, payload)

    async def render(replay: dict[str, Any]) -> bytes:
        return json_bytes(await rt.service.render_replay(tenant, replay))

    return _send(await rt.idempotency.run(tenant.id, key, request_fingerprint, handle, render=render,
                                          ttl_s=tenant.idempotency_ttl_s))


router = APIRouter()


@router.post("/v1/jobs", status_code=202, response_model=JobResource, tags=["jobs"],
             summary="Submit a job", **_authenticated(409, 413, 422, 429, 503))
async def submit_job(request: Request, body: JobRequest, tenant: TenantDep,
                     idempotency_key: IdempotencyKey = None) -> Response:
    """Accept a job and queue it on the tier the routing policy picks. Answers 202 with the job
    resource at once; follow it with `GET /v1/jobs/{id}?wait=60`."""
    service = runtime(request).service

    async def handle(receipt: Receipt) -> StoredResponse:
        job = await service.submit(tenant, body, receipt)
        return receipt.prepared or StoredResponse(202, json_bytes(job.public()), replay={"job": job.id})

    return await _idempotent(request, tenant, idempotency_key, body.model_dump(mode="json"), handle)


@router.post(BATCH_PATH, status_code=202, response_model=BatchResponse, tags=["jobs"],
             summary="Submit many jobs", **_authenticated(409, 413, 422, 429, 503))
async def submit_batch(request: Request, body: BatchRequest, tenant: TenantDep,
                       idempotency_key: IdempotencyKey = None) -> Response:
    """Submit up to `max_batch_jobs` jobs. Each item gets its own result (202 with the job, or an
    error); with `all_or_nothing` one bad item rejects the batch and nothing is stored. A batch
    counts its jobs against the quota; items beyond it get 429."""
    service = runtime(request).service

    async def handle(receipt: Receipt) -> StoredResponse:
        outcome = await service.submit_batch(tenant, body, receipt)
        return receipt.prepared or StoredResponse(202, json_bytes(outcome.body()), replay=outcome.replay())

    return await _idempotent(request, tenant, idempotency_key, body.model_dump(mode="json"), handle)


@router.get("/v1/jobs", response_model=JobList, tags=["jobs"], summary="List jobs",
            **_authenticated(400, 422))
async def list_jobs(
    request: Request,
    tenant: TenantDep,
    limit: Annotated[int | None, Query(ge=1, description="Page size (default 20, at most list_max_limit).")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    status: Annotated[JobStatus | None, Query()] = None,
    task: Annotated[str | None, Query(max_length=64)] = None,
    tier: Annotated[Tier | None, Query(description="The tier the job is on, or ended on.")] = None,
    created_after: Annotated[datetime | None, Query(description="Created at or after (ISO 8601 or Unix s).")] = None,
    created_before: Annotated[datetime | None, Query(description="Created before (ISO 8601 or Unix s).")] = None,
) -> Response:
    """The tenant's jobs, newest first, with cursor pagination."""
    rt = runtime(request)
    page_size = limit or rt.settings.list_default_limit
    if page_size > rt.settings.list_max_limit:
        raise ApiError(422, "invalid_request", f"limit must be at most {rt.settings.list_max_limit}",
                       [{"field": "query.limit", "message": f"at most {rt.settings.list_max_limit}",
                         "type": "less_than_equal"}])
    page = await rt.service.list(tenant, ListQuery(limit=page_size, cursor=cursor, status=status, task=task,
                                                   tier=tier, created_after=created_after,
                                                   created_before=created_before))
    return json_response(200, {"object": "list", "data": [job.public() for job in page.jobs],
                                "has_more": page.has_more, "next_cursor": page.next_cursor})


@router.get("/v1/jobs/{job_id}", response_model=JobResource, tags=["jobs"], summary="Get a job (long-poll)",
            **_authenticated(404, 422, 429))
async def get_job(
    request: Request,
    tenant: TenantDep,
    job_id: Annotated[str, Path(max_length=128)],
    wait: Annotated[float, Query(ge=0, le=60, description="Seconds to wait for the job to end (long-poll).")] = 0,
) -> Response:
    """The job. With `wait`, answers as soon as the job ends, or after `wait` seconds with its
    current state."""
    job = await runtime(request).service.get(tenant, job_id, wait)
    return json_response(200, job.public())


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobResource, tags=["jobs"], summary="Cancel a job",
             **_authenticated(404, 409))
async def cancel_job(request: Request, tenant: TenantDep, job_id: Annotated[str, Path(max_length=128)],
                     idempotency_key: IdempotencyKey = None) -> Response:
    """Cancel a job that has not ended; 409 `job_already_ended` (with the job) if it has."""
    service = runtime(request).service

    async def handle(_: Receipt) -> StoredResponse:
        job = await service.cancel(tenant, job_id)
        return StoredResponse(200, json_bytes(job.public()), replay={"job": job.id})

    return await _idempotent(request, tenant, idempotency_key, {"job_id": job_id}, handle)


@router.post("/v1/jobs/{job_id}/replay", status_code=202, response_model=JobResource, tags=["dead letters"],
             summary="Replay a dead-lettered job", **_authenticated(404, 409, 422))
async def replay_job(request: Request, tenant: TenantDep, job_id: Annotated[str, Path(max_length=128)],
                     body: ReplayRequest | None = None, idempotency_key: IdempotencyKey = None) -> Response:
    """Run a dead-lettered job again: a new attempt of the same job, its earlier attempts kept, with
    a fresh deadline; its entry leaves the dead letters. 202 with the job. Idempotent per entry: a
    repeat once the entry is replayed answers 200 with the job as it is and starts nothing (and per
    `Idempotency-Key`, as every POST). 409 `job_not_dead_lettered` for a job that never was."""
    dead_letters = runtime(request).dead_letters
    deadline_s = body.deadline_s if body is not None else None

    async def handle(_: Receipt) -> StoredResponse:
        replay = await dead_letters.replay(tenant, job_id, deadline_s)
        return StoredResponse(202 if replay.replayed else 200, json_bytes(replay.job.public()),
                              replay={"job": replay.job.id})

    return await _idempotent(request, tenant, idempotency_key, {"job_id": job_id, "deadline_s": deadline_s}, handle)


@router.get("/v1/dead-letters", response_model=DeadLetterList, tags=["dead letters"], summary="List dead letters",
            **_authenticated(400, 422))
async def list_dead_letters(
    request: Request,
    tenant: TenantDep,
    limit: Annotated[int | None, Query(ge=1, description="Page size (default 20, at most list_max_limit).")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    reason: Annotated[str | None, Query(max_length=64, description="Only entries with this reason.")] = None,
    failed_after: Annotated[datetime | None, Query(description="Failed at or after (ISO 8601 or Unix s).")] = None,
    failed_before: Annotated[datetime | None, Query(description="Failed before (ISO 8601 or Unix s).")] = None,
) -> Response:
    """The tenant's jobs that failed for a reason a person can act on (`deadline_exceeded`,
    `frontier_rejected`, `budget_exceeded`, `validation_failed`), newest first, each with its
    reason; replay one with `POST /v1/jobs/{id}/replay`."""
    rt = runtime(request)
    page_size = limit or rt.settings.list_default_limit
    if page_size > rt.settings.list_max_limit:
        raise ApiError(422, "invalid_request", f"limit must be at most {rt.settings.list_max_limit}",
                       [{"field": "query.limit", "message": f"at most {rt.settings.list_max_limit}",
                         "type": "less_than_equal"}])
    page = await rt.dead_letters.list_entries(tenant, DeadLetterQuery(
        limit=page_size, cursor=cursor, reason=reason,
        failed_after=failed_after.timestamp() if failed_after is not None else None,
        failed_before=failed_before.timestamp() if failed_before is not None else None))
    return json_response(200, {"object": "list", "data": [e.model_dump(mode="json") for e in page.entries],
                                "has_more": page.has_more, "next_cursor": page.next_cursor})


@router.post("/v1/dead-letters/replay", response_model=BulkReplayResponse, tags=["dead letters"],
             summary="Replay dead letters by reason and time range", **_authenticated(409, 422))
async def replay_dead_letters(request: Request, tenant: TenantDep, body: BulkReplayRequest,
                              idempotency_key: IdempotencyKey = None) -> Response:
    """Replay the tenant's newest `limit` dead letters that match `reason` and the time range; call
    again while `has_more`. An entry replayed meanwhile is listed in `skipped`."""
    dead_letters = runtime(request).dead_letters

    async def handle(_: Receipt) -> StoredResponse:
        replayed, skipped, has_more = await dead_letters.replay_many(tenant, DeadLetterQuery(
            limit=body.limit, reason=body.reason, failed_after=body.failed_after,
            failed_before=body.failed_before), body.deadline_s)
        return StoredResponse(200, json_bytes({"object": "bulk_replay", "replayed": replayed, "skipped": skipped,
                                               "has_more": has_more}))

    return await _idempotent(request, tenant, idempotency_key, body.model_dump(mode="json"), handle)


@router.get("/v1/tasks", response_model=TaskList, tags=["tasks"], summary="List the task catalog",
            **_authenticated())
async def list_tasks(request: Request, _tenant: TenantDep) -> Response:
    tasks = runtime(request).service.tasks()
    return json_response(200, {"object": "list", "data": [task.public() for task in tasks]})


@router.get("/v1/tasks/{name}", tags=["tasks"], summary="Get a task", **_authenticated(404))
async def get_task(request: Request, _tenant: TenantDep, name: str) -> Response:
    return json_response(200, runtime(request).service.task(name).public())


@router.post("/v1/jobs/{job_id}/feedback", response_model=JobResource, tags=["jobs"],
             summary="Give the correct answer to a job", **_authenticated(404, 409, 422))
async def give_feedback(request: Request, tenant: TenantDep, job_id: Annotated[str, Path(max_length=128)],
                        body: FeedbackRequest) -> Response:
    """The answer the job should have had (and a comment), by the job's own tenant, once per job: a
    repeat with the same answer returns the job, another answer is 409 `feedback_already_given`.
    Counted in `/v1/stats` (`feedback`, `feedback_errors:{tier}`), shown on the job, and, for a task
    that learns, kept as a training example."""
    job = await runtime(request).learning.feedback(tenant, job_id, body)
    return json_response(200, job.public())


@router.get("/v1/tasks/{name}/model", tags=["tasks"], summary="A task's live model", **_authenticated(404))
async def get_task_model(request: Request, _tenant: TenantDep, name: str) -> Response:
    """The scorer answering the task on the small tier: the trained head's version, when it was
    trained, its calibrated threshold and novelty floor, held-out metrics (accuracy, the accuracy
    bound of kept answers, the expected frontier share, shadow agreement), and examples per
    source and label; the seed nearest-neighbour scorer until a head goes live."""
    return json_response(200, await runtime(request).learning.model(name))


@router.get("/v1/tasks/{name}/examples", tags=["tasks"], summary="Export the tenant's examples of a task (JSONL)",
            **_authenticated(404))
async def export_examples(request: Request, tenant: TenantDep, name: str) -> StreamingResponse:
    """One JSON object per line: text, answer, source (frontier, shadow, feedback), job id, model and
    time, for the calling tenant's jobs (`smallfirst examples export TASK` exports every tenant's)."""
    lines = await runtime(request).learning.export(tenant, name)
    return StreamingResponse(lines, media_type="application/x-ndjson")


@router.get("/v1/stats", response_model=StatsResponse, tags=["stats"], summary="Usage, escalations, cost, savings",
            **_authenticated(404))
async def get_stats(request: Request, tenant: TenantDep,
                    task: Annotated[str | None, Query(description="Only this task.")] = None) -> Response:
    """The calling tenant's figures per task and in total: jobs by status and tier, escalation rate
    and reasons, cost per tier, and what the small tier saved against the frontier tier."""
    stats = await runtime(request).service.stats(tenant, task)
    return json_response(200, stats.model_dump(mode="json"))


@router.get("/healthz", response_model=Health, tags=["operations"], summary="Liveness")
async def healthz() -> Response:
    """The process is up (no I/O)."""
    return json_response(200, {"status": "ok", "checks": {}})


@router.get("/readyz", response_model=Health, tags=["operations"], summary="Readiness",
            responses=_error_responses(503))
async def readyz(request: Request) -> Response:
    """Redis answers, the catalog is loaded, the event subscription and the publisher run."""
    rt = runtime(request)
    checks: dict[str, Any] = {"catalog": {"ok": True, "tasks": len(rt.catalog)}}
    try:
        await asyncio.wait_for(rt.redis.ping(), _READY_PING_TIMEOUT_S)
        checks["redis"] = {"ok": True}
    except (redis.RedisError, OSError, TimeoutError) as exc:
        # The error text names hosts and ports: it goes to the log, the probe gets only the verdict.
        log.warning("readiness: redis does not answer: %s", str(exc) or type(exc).__name__)
        checks["redis"] = {"ok": False}
    checks["job_events"] = {"ok": rt.hub.subscribed}
    checks["publisher"] = {"ok": rt.pump.alive}
    if all(check["ok"] for check in checks.values()):
        return json_response(200, {"status": "ok", "checks": checks})
    failing = sorted(name for name, check in checks.items() if not check["ok"])
    return json_response(503, error_body("not_ready", f"not ready: {', '.join(failing)}", {"checks": checks}))


@router.get("/metrics", tags=["operations"], summary="Prometheus metrics", include_in_schema=True)
async def metrics(request: Request) -> Response:
    """Job counters of this process, queue depths (read from Redis now), process figures."""
    # A thread, not the loop: reading the queue depths waits on Redis (up to its short timeout).
    body, content_type = await anyio.to_thread.run_sync(runtime(request).metrics.render,
                                                        request.headers.get("accept"))
    return Response(content=body, media_type=content_type)


def create_app(settings: ApiSettings) -> FastAPI:
    # Tracing from the OTEL_* environment, before any client exists: Redis commands are traced
    # inside requests (nothing at all while tracing is off). Celery is left uninstrumented: each
    # message carries its job's traceparent anyway (Publisher), while a producer span per message
    # (500 for one batch request) made each publish about 4x as costly when measured.
    telemetry.configure_telemetry(k.SERVICE_API)
    telemetry.instrument_redis()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            catalog = load_catalog(settings.catalog_path)
        except CatalogError as exc:
            log.error("cannot start: the task catalog is invalid: %s", exc)
            raise
        client = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=10,
                                         health_check_interval=30)
        # Its own connection pool: the subscription holds a connection for as long as the process runs.
        events_client = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_keepalive=True)
        celery_app = make_celery(settings)
        # The publisher thread's own blocking client: it confirms each published group there.
        outbox_client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=10)
        outbox = JobStore(outbox_client, retention_s=settings.job_retention_s,
                          stale_after_s=settings.sweep_stale_after_s)
        # Fair scheduling (fair.py): queued jobs go to their tenants' fair lists, on the same client.
        publisher = Publisher(celery_app, FairQueues(outbox_client) if settings.fair_scheduling else None)
        pump = PublishPump(publisher, settings.publish_batch_max, on_published=outbox.published)
        hub = JobEventHub(events_client)
        metrics = ApiMetrics(settings.redis_url)
        store = AsyncJobStore(client, retention_s=settings.job_retention_s, stale_after_s=settings.sweep_stale_after_s)
        committer = GroupCommitter(store, settings.commit_group_max_jobs)
        callbacks = CallbackChecker(max_concurrency=settings.callback_dns_max_concurrency,
                                    max_pending=settings.callback_dns_max_pending,
                                    timeout_s=settings.callback_dns_timeout_s)
        service = JobService(settings=settings, catalog=catalog, redis=client, store=store, committer=committer,
                             pump=pump,
                             quota=QuotaLimiter(client, settings.default_quota_jobs_per_minute), hub=hub,
                             stats=StatsReader(client), metrics=metrics, callbacks=callbacks)
        tenant_registry = AsyncTenantRegistry(client)
        operator_key = settings.operator_key.get_secret_value() if settings.operator_key is not None else None
        dead_letters = DeadLetterService(settings, client, store, pump, metrics)
        learning = Learning(service, settings.redis_url, client)
        app.state.dashboard = Dashboard.build(settings, DashboardViews(
            catalog=catalog, redis=client, service=service, tenants=tenant_registry, operator_key=operator_key,
            dead_letters=StoredDeadLetters(dead_letters), learning=StoredLearning(learning)), client)
        app.state.runtime = Runtime(
            settings=settings, catalog=catalog, redis=client, service=service,
            auth=Authenticator(tenant_registry, settings.tenant_cache_ttl_s),
            idempotency=IdempotencyStore(client, ttl_s=settings.idempotency_ttl_s,
                                         in_flight_ttl_s=settings.idempotency_in_flight_ttl_s),
            hub=hub, pump=pump, metrics=metrics, learning=learning,
            dead_letters=dead_letters)
        pump.start()
        await hub.start()
        log.info("smallfirst api ready: %d tasks from %s", len(catalog), settings.catalog_path)
        try:
            yield
        finally:
            await hub.stop()
            await pump.stop()
            celery_app.close()
            outbox_client.close()
            callbacks.close()
            metrics.close()
            app.state.runtime.learning.close()
            await events_client.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose()
            await client.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose()

    app = FastAPI(title="smallfirst", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            components = document.setdefault("components", {})
            components["securitySchemes"] = {SECURITY_SCHEME: {
                "type": "http", "scheme": "bearer", "description": "A tenant's API key (sf_live_...)."}}
            _document_one_error_shape(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    install_error_handlers(app)
    app.include_router(router)
    # The dashboard: server-rendered pages and their one stylesheet and script (dashboard/routes.py).
    app.include_router(dashboard_router)
    app.mount(f"{DASHBOARD_PREFIX}/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")

    def limit_for_path(path: str) -> int:
        return settings.max_batch_body_bytes if path == BATCH_PATH else settings.max_body_bytes

    app.add_middleware(BodySizeLimit, limit_for_path=limit_for_path)
    # Outermost: a request's server span (continuing the caller's traceparent) covers every middleware.
    telemetry.instrument_fastapi(app)
    return app


def _document_one_error_shape(document: dict[str, Any]) -> None:
    """FastAPI documents its validation errors with a schema of its own; ours go out as ErrorResponse."""
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            invalid = operation.get("responses", {}).get("422")
            if invalid is not None:
                invalid["content"] = {"application/json": {"schema": error_ref}}
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` (several worker processes each build their own app, and
    configure their own logging: a spawned worker does not inherit the parent's handlers)."""
    settings = ApiSettings()
    telemetry.configure_logging(k.SERVICE_API, settings.log_level, json=settings.log_json)
    return create_app(settings)
