"""The gateway's OpenAI-compatible HTTP front end (aiohttp).

One data plane, two front ends: every completion goes through ``Gateway.generate`` /
``Gateway.generate_stream`` exactly as a gRPC ``Generate`` does, so routing, release
rules, fallback and per-request results are the same. Authentication uses the same hook
as the gRPC server (``authorization: Bearer <key>``), run under the gRPC method name the
call corresponds to, and the caller becomes ``current_principal`` for the call.

Routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` = server-sent events ending with
``data: [DONE]``). See docs/openai.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ftops.gateway.v1 import gateway_pb2
from ftops_gateway.alias_access import GuardedGateway
from ftops_gateway.gateway import BASE_MODEL, Gateway
from ftops_gateway.openai_errors import OpenAIError, from_exception, invalid
from ftops_gateway.openai_responses import Shape
from ftops_gateway.openai_schema import ChatCompletionRequest, CompletionRequest, parse
from ftops_gateway.settings import GatewaySettings
from ftops_runtime import telemetry, tls
from ftops_runtime.auth import Role
from ftops_runtime.errors import NotFound, PermissionDenied
from ftops_runtime.interceptors import (
    Authenticator,
    Principal,
    api_key_authenticator,
    current_principal,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer("ftops.openai")

# The gRPC methods whose authorization an HTTP call shares.
_GRPC = "/ftops.gateway.v1.GatewayService/"
METHOD_GENERATE = _GRPC + "Generate"
METHOD_STREAM = _GRPC + "GenerateStream"
METHOD_ROUTES = _GRPC + "GetRoute"
OWNER = "ftops"
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _dumps(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _error(exc: OpenAIError) -> web.Response:
    return _json(exc.body(), status=exc.status, headers=exc.headers())


def tenant_of(principal: Principal, authorization: str) -> str:
    """The tenant recorded with each result: the authenticated key's id; with auth off,
    the same kind of id derived from the bearer token, so per-client figures still work.
    Never the key itself: results travel on the bus."""
    if not principal.anonymous:
        return principal.key_id
    if authorization.lower().startswith("bearer ") and authorization[7:].strip():
        return hashlib.sha256(authorization[7:].strip().encode()).hexdigest()[:12]
    return ""


@web.middleware
async def _traced(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A SERVER span per request, child of the caller's (W3C traceparent header), as the
    gRPC front end's tracing interceptor makes; the data plane's spans nest inside."""
    resource = request.match_info.route.resource
    # The route template ("/v1/models/{model}"), not the path: span names stay few.
    name = f"{request.method} {resource.canonical if resource else 'unmatched'}"
    with tracer.start_as_current_span(
        name,
        context=telemetry.extract({k.lower(): v for k, v in request.headers.items()}),
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.path},
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return response


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure answered in OpenAI's error format, unknown paths included."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(OpenAIError(exc.status, f"{request.method} {request.path}: {exc.reason}"))
    except Exception as exc:
        return _error(from_exception(exc))


class OpenAIHttpServer:
    """Serves the OpenAI API on ``settings.grpc_host:settings.http_port`` (-1 = off,
    0 = a free port), over HTTPS when the gateway has a certificate (FTOPS_TLS_CERT_FILE).
    ``start()`` then ``stop()``; ``port`` is the bound port."""

    def __init__(
        self,
        gateway: Gateway,
        settings: GatewaySettings,
        *,
        authenticate: Authenticator | None = None,
    ) -> None:
        self._gateway = gateway
        self._settings = settings
        self._authenticate = authenticate or api_key_authenticator(settings.api_key_set())
        server_tls = tls.load(settings).server
        self._ssl_context = server_tls.ssl_context() if server_tls is not None else None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def enabled(self) -> bool:
        return self._settings.http_port >= 0

    @property
    def address(self) -> str:
        return f"{self._settings.grpc_host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[_traced, _openai_errors],
            client_max_size=self._settings.max_message_mb * 1024 * 1024,
        )
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model:.+}", self._get_model)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        return app

    async def start(self) -> int:
        if not self.enabled:
            return 0
        # handler_cancellation: a client that hangs up cancels its handler, and with it
        # the upstream generation, instead of generating into a closed socket.
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            shutdown_timeout=self._settings.shutdown_grace_s,
            access_log=None,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self._settings.grpc_host,
            self._settings.http_port,
            ssl_context=self._ssl_context,
        )
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        scheme = "https" if self._ssl_context is not None else "http"
        log.info("OpenAI-compatible HTTP on %s://%s", scheme, self.address)
        return self.port

    async def stop(self) -> None:
        """Stops accepting, lets in-flight requests finish within the drain grace."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- helpers ---------------------------------------------------------------------

    async def _principal(self, request: web.Request, method: str) -> Principal:
        # HTTP headers are what gRPC metadata is on the other front end (lower-cased).
        metadata = {key.lower(): value for key, value in request.headers.items()}
        return await self._authenticate(metadata, method)

    def _route_table(self) -> dict[str, gateway_pb2.Route]:
        # This replica's copy of the tables (what it routes by): no Redis round trip,
        # and the list keeps working while Redis is down.
        return {route.alias: route for route in self._gateway.routes.routes()}

    @staticmethod
    async def _body(request: web.Request) -> Any:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(f"the request body is not valid JSON: {exc}") from None

    # -- models ----------------------------------------------------------------------

    @staticmethod
    def _model(model_id: str, **ftops: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": model_id, "object": "model", "created": 0}
        entry["owned_by"] = OWNER
        if ftops:
            entry["ftops"] = ftops
        return entry

    def _alias_model(self, route: gateway_pb2.Route) -> dict[str, Any]:
        return self._model(
            route.alias,
            kind="alias",
            stable_version_id=route.stable_version_id,
            candidate_version_id=route.candidate_version_id,
            candidate_weight=route.candidate_weight if route.candidate_version_id else 0,
            release_id=route.release_id,
        )

    async def _visible_routes(self, principal: Principal) -> dict[str, gateway_pb2.Route]:
        """The routes whose alias the caller may view: its teams' (platform admins and
        auth off: all). Other teams' aliases and versions are not shown at all."""
        routes = self._route_table()
        access = self._gateway.access if isinstance(self._gateway, GuardedGateway) else None
        if access is None:
            return routes
        token = current_principal.set(principal)
        try:
            return {alias: r for alias, r in routes.items() if await access.may_view(r)}
        finally:
            current_principal.reset(token)

    async def _list_models(self, request: web.Request) -> web.Response:
        routes = await self._visible_routes(await self._principal(request, METHOD_ROUTES))
        data = [self._model(BASE_MODEL, kind="base")]
        pointed_at: dict[str, list[str]] = {}
        for alias in sorted(routes):
            route = routes[alias]
            if not route.stable_version_id:
                continue
            data.append(self._alias_model(route))
            for version_id in (route.stable_version_id, route.candidate_version_id):
                if version_id:
                    pointed_at.setdefault(version_id, []).append(alias)
        for version_id in sorted(pointed_at):
            data.append(self._model(version_id, kind="version", aliases=pointed_at[version_id]))
        return _json({"object": "list", "data": data})

    async def _get_model(self, request: web.Request) -> web.Response:
        principal = await self._principal(request, METHOD_ROUTES)
        name = request.match_info["model"]
        if name == BASE_MODEL:
            return _json(self._model(BASE_MODEL, kind="base"))
        # Another team's alias or version is described to nobody but its team: the same
        # NOT_FOUND as for a model that does not exist (its existence is not revealed).
        missing = NotFound(f"model {name!r} is neither a routed alias nor a registered version")
        access = self._gateway.access if isinstance(self._gateway, GuardedGateway) else None
        token = current_principal.set(principal)
        try:
            route = None if ":" in name else await self._gateway.routes.lookup(name)
            if route is not None and route.stable_version_id:
                if access is not None and not await access.may_view(route):
                    raise missing
                return _json(self._alias_model(route))
            try:
                version_id = await self._gateway.versions.resolve(name, what="model")
                if access is not None:
                    await access.require_version(version_id, Role.viewer, "GetModel")
            except (NotFound, PermissionDenied):
                raise missing from None
            return _json(self._model(name, kind="version", version_id=version_id))
        finally:
            current_principal.reset(token)

    # -- completions -----------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, CompletionRequest, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, ChatCompletionRequest, chat=True)

    async def _complete(
        self,
        request: web.Request,
        schema: type[CompletionRequest] | type[ChatCompletionRequest],
        *,
        chat: bool,
    ) -> web.StreamResponse:
        body = await self._body(request)
        stream = isinstance(body, dict) and body.get("stream") is True
        principal = await self._principal(request, METHOD_STREAM if stream else METHOD_GENERATE)
        parsed = parse(schema, body)
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        if not REQUEST_ID.fullmatch(request_id):
            # It becomes the response id and the key of the result on the bus.
            raise invalid("X-Request-Id must be 1-128 characters of A-Z a-z 0-9 . _ -")
        generate = parsed.to_generate(
            request_id=request_id,
            tenant=tenant_of(principal, request.headers.get("Authorization", "")),
        )
        shape = Shape(
            chat=chat,
            id=f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            model=parsed.model,
            created=int(time.time()),
        )
        token = current_principal.set(principal)
        try:
            if parsed.stream:
                return await self._stream(request, generate, shape, parsed.include_usage)
            reply = await self._gateway.generate(generate)
        finally:
            current_principal.reset(token)
        shape.version_id = reply.version_id
        body = shape.response(
            reply.text, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens
        )
        return _json(body, headers=self._headers(request_id, reply.version_id, reply.arm))

    @staticmethod
    def _headers(request_id: str, version_id: str, arm: str) -> dict[str, str]:
        return {
            "X-Request-Id": request_id,
            "X-Ftops-Version": version_id or BASE_MODEL,
            "X-Ftops-Arm": arm,
        }

    async def _stream(
        self,
        request: web.Request,
        generate: gateway_pb2.GenerateRequest,
        shape: Shape,
        include_usage: bool,
    ) -> web.StreamResponse:
        # An async generator function: closable, whatever its annotation says.
        chunks = cast(
            "AsyncGenerator[gateway_pb2.GenerateChunk, None]",
            self._gateway.generate_stream(generate),
        )
        try:
            # Wait for the first chunk before answering: until then a failure (unknown
            # model, overload, the candidate falling back to stable) can still be a
            # proper HTTP status instead of an error event inside a 200 stream.
            first = await anext(chunks, None)
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",  # proxies must not buffer the stream
                    **self._headers(
                        generate.request_id,
                        first.version_id if first else "",
                        first.arm if first else "",
                    ),
                }
            )
            await response.prepare(request)
            shape.version_id = first.version_id if first else ""
            await self._events(response, chunks, first, shape, include_usage)
            return response
        finally:
            # Closing the generator ends the upstream gRPC stream (the client hung up,
            # or the stream ended): the inference replica stops generating.
            await chunks.aclose()

    async def _events(
        self,
        response: web.StreamResponse,
        chunks: AsyncIterator[gateway_pb2.GenerateChunk],
        first: gateway_pb2.GenerateChunk | None,
        shape: Shape,
        include_usage: bool,
    ) -> None:
        async def send(payload: Any) -> None:
            await response.write(f"data: {_dumps(payload)}\n\n".encode())

        completion_tokens = 0
        prompt_tokens = 0
        try:
            if shape.chat:
                await send(shape.chunk("", role=True))
            chunk = first
            while chunk is not None:
                completion_tokens = max(completion_tokens, chunk.completion_tokens)
                # GenerateChunk gains prompt_tokens with the gateway's contract update.
                prompt_tokens = max(prompt_tokens, getattr(chunk, "prompt_tokens", 0))
                if chunk.text or chunk.finish_reason:
                    await send(shape.chunk(chunk.text, chunk.finish_reason))
                chunk = await anext(chunks, None)
        except ConnectionError:
            raise
        except Exception as exc:
            # Headers are out: the error can only be an event (OpenAI does the same).
            await send(from_exception(exc).body())
        else:
            if include_usage:
                await send(shape.usage_chunk(prompt_tokens, completion_tokens))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
