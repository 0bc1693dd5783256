"""API keys on the monitor's HTTP endpoint (``/metrics``, ``/dashboard`` and its feed),
checked exactly as its gRPC calls are (the same authenticator: the registry's answer,
cached, forgotten at once on revocation).

A scraper sends ``Authorization: Bearer <key>`` (or ``x-ftops-key``). A browser cannot
set a header on a page load, so it hands the key over once: ``/dashboard?key=<key>`` (or
the form a refused page shows, which posts it) is answered with a redirect that keeps the
key in an HttpOnly, SameSite=Strict cookie and drops it from the address. The key is
never logged (the server keeps no access log). Refusals are 401 and go to the audit log
like gRPC refusals. With access control off every caller sees everything."""

from __future__ import annotations

import html
import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from multidict import CIMultiDict

from ftops_runtime.auth import MISSING_KEY as GRPC_MISSING_KEY
from ftops_runtime.auth import AuthPrincipal
from ftops_runtime.denials import DenialRecorder, key_from_metadata, key_id_of, source_of
from ftops_runtime.errors import Unauthenticated, Unavailable
from ftops_runtime.interceptors import Authenticator

log = logging.getLogger(__name__)

KEY_COOKIE = "ftops_key"
KEY_PARAM = "key"
LOGIN_PATH = "/dashboard/login"
LOGOUT_PATH = "/dashboard/logout"
# Served without a key: the page's script and style carry no team's data.
PUBLIC_PREFIXES = ("/dashboard/static/",)
# Request keys: the caller, and a re-check of its key (a revoked key ends an open stream).
CALLER = web.RequestKey("ftops_caller", AuthPrincipal)
StillValid = Callable[[], Awaitable[bool]]
STILL_VALID: web.RequestKey[StillValid] = web.RequestKey("ftops_still_valid")
MISSING_KEY = (
    "missing API key: scrapers send 'Authorization: Bearer <key>'; "
    "a browser opens /dashboard?key=<key> once"
)
LOGIN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ftops monitor: API key needed</title></head>
<body style="font-family: sans-serif; margin: 3em">
<h1>API key needed</h1><p>{message}</p>
<form method="post" action="{action}">
<label>API key <input type="password" name="key" autocomplete="off" size="60"></label>
<button type="submit">Open the dashboard</button>
</form></body></html>
"""


def caller_of(request: web.Request) -> AuthPrincipal | None:
    """Who is calling, as the middleware resolved it (None where none is installed)."""
    return request.get(CALLER)


def still_valid(request: web.Request) -> StillValid | None:
    return request.get(STILL_VALID)


class HttpAccess:
    """The aiohttp middleware (``middleware``) and the login routes (``mount``)."""

    def __init__(self, authenticate: Authenticator, denials: DenialRecorder | None) -> None:
        self._authenticate = authenticate
        self._denials = denials

    def mount(self, app: web.Application) -> None:
        app.middlewares.append(self.middleware)
        app.router.add_post(LOGIN_PATH, self._login)
        app.router.add_get(LOGOUT_PATH, self._logout)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith(PUBLIC_PREFIXES) or request.path in (LOGIN_PATH, LOGOUT_PATH):
            return await handler(request)
        handed_over = request.query.get(KEY_PARAM, "")
        if handed_over and request.method == "GET":
            await self._resolve(request, handed_over)
            return self._keep(request, handed_over, request.rel_url.without_query_params(KEY_PARAM))
        key = self._presented(request)
        request[CALLER] = await self._resolve(request, key)

        async def still_valid() -> bool:
            try:
                await self._authenticate(_metadata(key), _method(request))
            except (Unauthenticated, Unavailable):
                return False
            return True

        request[STILL_VALID] = still_valid
        return await handler(request)

    @staticmethod
    def _presented(request: web.Request) -> str:
        header = key_from_metadata({k.lower(): v for k, v in request.headers.items()})
        return header or request.cookies.get(KEY_COOKIE, "")

    async def _resolve(self, request: web.Request, key: str) -> AuthPrincipal:
        """The key's principal; 401 (audited) or 503 otherwise."""
        try:
            principal = await self._authenticate(_metadata(key), _method(request))
        except Unauthenticated as exc:
            self._audit(request, exc, key)
            raise self._refusal(request, str(exc)) from None
        except Unavailable as exc:
            raise web.HTTPServiceUnavailable(text=str(exc)) from None
        if not isinstance(principal, AuthPrincipal):  # a static-key hook: no roles
            principal = AuthPrincipal(key_id=principal.key_id, anonymous=principal.anonymous)
        return principal

    def _audit(self, request: web.Request, exc: Unauthenticated, key: str) -> None:
        if self._denials is None:
            return
        self._denials.record(
            method=_method(request),
            code=grpc.StatusCode.UNAUTHENTICATED,
            reason=str(exc),
            key_id=key_id_of(key),
            source=source_of(request.remote or ""),
        )

    @staticmethod
    def _refusal(request: web.Request, message: str) -> web.HTTPUnauthorized:
        if message == GRPC_MISSING_KEY:
            message = MISSING_KEY
        headers = CIMultiDict({"WWW-Authenticate": 'Bearer realm="ftops monitor"'})
        headers["Cache-Control"] = "no-store"
        if request.path == "/dashboard" or request.path == "/":
            page = LOGIN_PAGE.format(message=html.escape(message), action=LOGIN_PATH)
            headers["Content-Type"] = "text/html; charset=utf-8"
            return web.HTTPUnauthorized(text=page, headers=headers)
        return web.HTTPUnauthorized(text=message + "\n", headers=headers)

    @staticmethod
    def _keep(request: web.Request, key: str, location: object) -> web.Response:
        """A redirect that keeps ``key`` in the cookie: never in an address again."""
        redirect = _see_other(str(location))
        redirect.set_cookie(
            KEY_COOKIE, key, httponly=True, samesite="Strict", path="/", secure=request.secure
        )
        return redirect

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        key = str(form.get(KEY_PARAM, "")).strip()
        await self._resolve(request, key)
        return self._keep(request, key, "/dashboard")

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        redirect = _see_other("/dashboard")
        redirect.del_cookie(KEY_COOKIE, path="/")
        return redirect


def _see_other(location: str) -> web.Response:
    # A plain response rather than HTTPSeeOther: its cookie must survive.
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _metadata(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def _method(request: web.Request) -> str:
    """What the audit log names: the HTTP method and the path, never the query."""
    return f"HTTP {request.method} {request.path}"
