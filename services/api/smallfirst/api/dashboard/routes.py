"""The dashboard's HTTP side, under /ui: sessions, CSRF, rendering. Pages come from `DashboardViews`.

Routes are thin: find the viewer, ask the view model for the page, render its template. A request
with the header `X-Dashboard-Fragment: live` gets only the page's live part (`_*_live.html`): the
small script (static/dashboard.js) fetches it every few seconds and swaps it in, so figures update without a
reload; without JavaScript every page is complete and links and forms work as they are.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import TypeAdapter, ValidationError

from smallfirst.api.dashboard.session import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    SessionSigner,
    login_token_ok,
    new_login_token,
)
from smallfirst.api.dashboard.views import DashboardViews, JobsFilter, Viewer, money, percent
from smallfirst.api.errors import ApiError
from smallfirst.api.settings import ApiSettings
from smallfirst.common import constants as k
from smallfirst.common.jobs import JobStatus, Tier

log = logging.getLogger(__name__)

PREFIX = "/ui"
STATIC_DIR = Path(__file__).parent / "static"
TEMPLATES_DIR = Path(__file__).parent / "templates"
FRAGMENT_HEADER = "x-dashboard-fragment"
SECURITY_HEADERS = {
    # Everything the pages use is served from here; charts are inline SVG with no style attributes.
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_DATETIME = TypeAdapter(datetime)


class Unauthenticated(Exception):
    pass


@dataclass
class Dashboard:
    """Built once per app by the lifespan: templates, the session signer (once its secret is
    known), the view model."""

    settings: ApiSettings
    views: DashboardViews
    redis: aioredis.Redis
    templates: jinja2.Environment
    _signer: SessionSigner | None = None
    _lock: asyncio.Lock | None = None

    @classmethod
    def build(cls, settings: ApiSettings, views: DashboardViews, redis: aioredis.Redis) -> Dashboard:
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
                                 undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        env.filters["money"] = money
        env.filters["percent"] = percent
        return cls(settings=settings, views=views, redis=redis, templates=env)

    async def signer(self) -> SessionSigner:
        """The signer; its secret is the configured one, or one shared by every API process in Redis
        (read on first use, so the API starts while Redis is away)."""
        if self._signer is not None:
            return self._signer
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._signer is None:
                configured = self.settings.ui_session_secret
                if configured is not None:
                    secret = configured.get_secret_value().encode()
                else:
                    await self.redis.set(k.UI_SESSION_SECRET_KEY, secrets.token_hex(32), nx=True)
                    stored = await self.redis.get(k.UI_SESSION_SECRET_KEY)
                    secret = stored if isinstance(stored, bytes) else str(stored).encode()
                self._signer = SessionSigner(secret, self.settings.ui_session_ttl_s)
        return self._signer

    async def viewer(self, request: Request) -> Viewer:
        signer = await self.signer()
        viewer = await self.views.viewer(signer.read(request.cookies.get(SESSION_COOKIE)))
        if viewer is None:
            raise Unauthenticated()
        return viewer

    def secure_cookies(self, request: Request) -> bool:
        configured = self.settings.ui_cookie_secure
        return configured if configured is not None else request.url.scheme == "https"

    async def render(self, request: Request, name: str, viewer: Viewer | None, status: int = 200,
                     live: str | None = None, **context: Any) -> Response:
        """`name` rendered; a fragment request gets `live` alone, the template of the page's live part."""
        csrf = (await self.signer()).csrf_token(viewer.session) if viewer is not None else ""
        if live is not None and request.headers.get(FRAGMENT_HEADER) == "live":
            name = live
        values = {"viewer": viewer, "csrf_token": csrf, "csrf_field": CSRF_FIELD, "prefix": PREFIX,
                  "refresh_s": self.settings.ui_refresh_s, "request_path": request.url.path, "page": "",
                  **context}
        body = self.templates.get_template(name).render(values)
        return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def dashboard(request: Request) -> Dashboard:
    ui: Dashboard = request.app.state.dashboard
    return ui


def _login_redirect(request: Request) -> Response:
    if request.headers.get(FRAGMENT_HEADER):
        return Response(status_code=401, headers=SECURITY_HEADERS)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': target})}", status_code=303,
                            headers=SECURITY_HEADERS)


def _safe_next(value: str | None) -> str:
    # Only pages of the dashboard itself: never another host (an open redirect) or scheme.
    if value and value.startswith(f"{PREFIX}/") and not value.startswith("//") and "\\" not in value:
        return value
    return f"{PREFIX}/overview"


async def _form(request: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body (the body size is limited by BodySizeLimit)."""
    parsed = parse_qs((await request.body()).decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in parsed.items()}


async def _error_page(request: Request, ui: Dashboard, viewer: Viewer | None, error: ApiError) -> Response:
    return await ui.render(request, "error.html", viewer, status=error.status, error=error)


router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("")
async def ui_root() -> Response:
    return RedirectResponse(f"{PREFIX}/overview", status_code=303)


@router.get("/login")
async def login_form(request: Request, next: str | None = None, failed: bool = False) -> Response:
    ui = dashboard(request)
    token = new_login_token()
    response = await ui.render(request, "login.html", None, status=401 if failed else 200, login_token=token,
                               next_url=_safe_next(next), failed=failed,
                               operator_login=ui.settings.operator_key is not None)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, path=f"{PREFIX}/login", httponly=True,
                        samesite="strict", secure=ui.secure_cookies(request))
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    ui = dashboard(request)
    form = await _form(request)
    next_url = _safe_next(form.get("next"))
    if not login_token_ok(request.cookies.get(LOGIN_CSRF_COOKIE), form.get(CSRF_FIELD)):
        return await _error_page(request, ui, None, ApiError(403, "csrf_failed",
                                                             "the login form expired; open it again"))
    identity = await ui.views.identify(form.get("api_key", ""))
    if identity is None:
        return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': next_url, 'failed': 'true'})}", status_code=303)
    role, tenant = identity
    _, cookie = (await ui.signer()).issue(role, tenant.id if tenant else None, form["api_key"].strip())
    response = RedirectResponse(next_url, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(SESSION_COOKIE, cookie, max_age=ui.settings.ui_session_ttl_s, path=PREFIX, httponly=True,
                        samesite="strict", secure=ui.secure_cookies(request))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=f"{PREFIX}/login")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    ui = dashboard(request)
    try:
        viewer = await ui.viewer(request)
    except Unauthenticated:
        return _login_redirect(request)
    if not (await ui.signer()).csrf_ok(viewer.session, (await _form(request)).get(CSRF_FIELD)):
        return await _error_page(request, ui, viewer, ApiError(403, "csrf_failed", "the form expired; reload"))
    response = RedirectResponse(f"{PREFIX}/login", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return response


@router.get("/overview")
async def overview(request: Request, window: str | None = None) -> Response:
    ui = dashboard(request)
    try:
        viewer = await ui.viewer(request)
    except Unauthenticated:
        return _login_redirect(request)
    return await ui.render(request, "overview.html", viewer, live="_overview_live.html", page="overview",
                           overview=await ui.views.overview(viewer, window))


@router.get("/learning")
async def learning(request: Request) -> Response:
    ui = dashboard(request)
    try:
        viewer = await ui.viewer(request)
    except Unauthenticated:
        return _login_redirect(request)
    return await ui.render(request, "learning.html", viewer, page="learning",
                           tasks=await ui.views.learning(viewer))


def _jobs_filter(params: dict[str, str]) -> tuple[JobsFilter, str]:
    """The list's filter from its query parameters; a value that does not parse is dropped and named."""
    problems: list[str] = []

    def pick(name: str, parse: Any) -> Any:
        value = params.get(name, "").strip()
        if not value:
            return None
        try:
            return parse(value)
        except (ValueError, ValidationError):
            problems.append(name)
            return None

    wanted = JobsFilter(status=pick("status", JobStatus), task=pick("task", str), tier=pick("tier", Tier),
                        tenant=pick("tenant", str), created_after=pick("created_after", _DATETIME.validate_python),
                        created_before=pick("created_before", _DATETIME.validate_python),
                        q=params.get("q", "").strip()[:128], cursor=params.get("cursor") or None)
    return wanted, (f"ignored: {', '.join(problems)} (not understood)" if problems else "")


@router.get("/jobs")
async def jobs(request: Request) -> Response:
    ui = dashboard(request)
    try:
        viewer = await ui.viewer(request)
    except Unauthenticated:
        return _login_redirect(request)
    wanted, notice = _jobs_filter(dict(request.query_params))
    if wanted.q.startswith("job_"):
        # A job id typed into the search box opens that job.
        return RedirectResponse(f"{PREFIX}/jobs/{quote(wanted.q, safe='')}", status_code=303)
    try:
        page = await ui.views.jobs(viewer, wanted)
    except ApiError as exc:
        return await _error_page(request, ui, viewer, exc)
    return await ui.render(request, "jobs.html", viewer, page="jobs", jobs=page, notice=notice,
                           next_link=f"{PREFIX}/jobs?{urlencode(wanted.params(cursor=page.next_cursor))}"
                           if page.next_cursor else "")


@router.get("/jobs/{job_id}")
async def job(request: Request, job_id: str) -> Response:
    ui = dashboard(request)
    try:
        viewer = await ui.viewer(request)
    except Unauthenticated:
        return _login_redirect(request)
    try:
        detail = await ui.views.job(viewer, job_id[:128])
    except ApiError as exc:
        return await _error_page(request, ui, viewer, exc)
    return await ui.render(request, "job.html", viewer, live="_job_live.html", page="jobs", detail=detail,
                           replayed=request.query_params.get("replayed") == "1")


@router.post("/jobs/{job_id}/replay")
async def replay(request: Request, job_id: str) -> Response:
    ui = dashboard(request)
    try:
        viewer = await ui.viewer(request)
    except Unauthenticated:
        return _login_redirect(request)
    if not (await ui.signer()).csrf_ok(viewer.session, (await _form(request)).get(CSRF_FIELD)):
        return await _error_page(request, ui, viewer, ApiError(403, "csrf_failed", "the form expired; reload"))
    try:
        await ui.views.replay(viewer, job_id[:128])
    except ApiError as exc:
        return await _error_page(request, ui, viewer, exc)
    return RedirectResponse(f"{PREFIX}/jobs/{quote(job_id, safe='')}?replayed=1", status_code=303,
                            headers=SECURITY_HEADERS)


@router.get("/dead-letters")
async def dead_letters(request: Request, cursor: str | None = None) -> Response:
    ui = dashboard(request)
    try:
        viewer = await ui.viewer(request)
    except Unauthenticated:
        return _login_redirect(request)
    try:
        page = await ui.views.dead_letters(viewer, cursor)
    except ApiError as exc:
        return await _error_page(request, ui, viewer, exc)
    return await ui.render(request, "dead_letters.html", viewer, page="dead-letters", letters=page,
                           next_link=f"{PREFIX}/dead-letters?{urlencode({'cursor': page.next_cursor})}"
                           if page.next_cursor else "")
