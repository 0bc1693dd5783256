"""The NATS JetStream event bus: streams, a publisher and durable pull consumers.

Delivery is at-least-once, so every handler must be idempotent on the event id.
A handler that raises is retried (``nak`` with a delay) up to ``max_deliver`` times;
a payload that cannot be parsed, or a handler that raises ``PermanentEventError``, is
acknowledged and copied to ``deadletter.<subject>`` so it never blocks the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig
from opentelemetry import metrics, trace

from ftops_runtime import telemetry
from ftops_runtime.errors import PermanentEventError
from ftops_runtime.events import DEAD_LETTER_PREFIX, PAYLOAD_TYPES, STREAMS
from ftops_runtime.namespace import Namespace
from ftops_runtime.retry import retry_forever
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)
tracer = trace.get_tracer("ftops.bus")
meter = metrics.get_meter("ftops.bus")
events_processed = meter.create_counter(
    "ftops.events.processed", description="Events handled, by subject, consumer and outcome"
)

E = TypeVar("E", bound=Message)


@dataclass(frozen=True)
class Delivery:
    """What a handler may want to know about the message besides its payload."""

    subject: str
    num_delivered: int
    msg: Msg

    async def in_progress(self) -> None:
        """Extend the ack deadline for handlers that take long (model loads)."""
        await self.msg.in_progress()


Handler = Callable[[E, Delivery], Awaitable[None]]


@dataclass
class _Subscription(Generic[E]):
    subject: str
    durable: str
    handler: Handler[Any]
    payload_type: type[E]
    deliver_policy: DeliverPolicy
    ack_wait_s: float
    inactive_threshold_s: float | None
    batch: int = 16
    task: asyncio.Task[None] | None = field(default=None)


class EventBus:
    """Owns one NATS connection. Connects in the background with backoff, so a service
    whose NATS is down starts, reports NOT_SERVING, and recovers by itself."""

    def __init__(
        self,
        servers: str,
        *,
        service: str,
        instance: str,
        max_deliver: int = 5,
        nak_delay_s: float = 1.0,
        stream_replicas: int = 1,
        connect_options: Mapping[str, Any] | None = None,
        namespace: Namespace | str = "",
    ) -> None:
        # Services speak logical subjects; the installation's prefix is applied here only.
        self.namespace = namespace if isinstance(namespace, Namespace) else Namespace(namespace)
        self._servers = [s.strip() for s in servers.split(",") if s.strip()]
        self.service = service
        self.instance = instance
        self._max_deliver = max_deliver
        self._nak_delay_s = nak_delay_s
        self._stream_replicas = stream_replicas
        # Credentials and TLS (ftops_runtime.tls.nats_connect_options); never logged.
        self._connect_options = dict(connect_options or {})
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._ready = asyncio.Event()
        self._subs: list[_Subscription[Any]] = []
        self._connect_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Begin connecting; returns at once. ``wait_ready`` waits for the connection."""
        if self._connect_task is None:
            self._connect_task = asyncio.create_task(self._connect_loop(), name="nats-connect")

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._nc is not None and self._nc.is_connected

    async def _connect_once(self) -> None:
        nc = await nats.connect(
            servers=self._servers,
            name=f"ftops-{self.service}-{self.instance}",
            connect_timeout=2,
            # After the first connection, let the client reconnect forever on its own.
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            **self._connect_options,
        )
        try:
            js = nc.jetstream(timeout=5)
            await ensure_streams(js, replicas=self._stream_replicas, namespace=self.namespace)
        except BaseException:
            await nc.close()
            raise
        self._nc, self._js = nc, js

    async def _connect_loop(self) -> None:
        await retry_forever(f"connect to NATS at {','.join(self._servers)}", self._connect_once)
        log.info("connected to NATS %s", self._nc.connected_url if self._nc else "?")
        self._ready.set()
        for sub in self._subs:
            self._start_consumer(sub)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._connect_task is not None:
            await cancel_and_wait([self._connect_task])
        # The consumer loops also stop on the closed flag (see cancel_and_wait).
        await cancel_and_wait([sub.task for sub in self._subs])
        if self._nc is not None and not self._nc.is_closed:
            # The consumers are stopped, so there is nothing left to drain: flush (pending
            # acks) and close. nats-py's drain() waits on each pull subscription's queue,
            # which a fetch leaves unjoinable (get_nowait without task_done), so it used
            # to hang for the whole drain timeout (30 s).
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()

    # -- publishing ------------------------------------------------------------------

    async def publish(self, subject: str, event: Message, *, timeout: float = 5.0) -> None:
        """Publish an event and wait for JetStream to store it.

        The event id doubles as ``Nats-Msg-Id`` so a retried publish is stored once.
        """
        if self._js is None:
            await self.wait_ready(timeout)
        assert self._js is not None
        headers: dict[str, str] = {}
        telemetry.inject(headers)
        event_id = _event_id(event)
        if event_id:
            headers["Nats-Msg-Id"] = event_id
        with tracer.start_as_current_span(
            f"publish {subject}", kind=trace.SpanKind.PRODUCER
        ) as span:
            span.set_attribute("messaging.system", "nats")
            span.set_attribute("messaging.destination.name", subject)
            span.set_attribute("messaging.message.id", event_id)
            await self._js.publish(
                self.namespace.subject(subject),
                event.SerializeToString(),
                timeout=timeout,
                headers=headers,
            )

    async def stored(self, subject: str, payload_type: type[E], *, timeout: float = 5.0) -> list[E]:
        """The payloads JetStream holds on ``subject`` now, oldest first: on a work queue,
        the waiting and the in-flight ones (an acked message is gone). Read message by
        message (stream get), so no consumer is created and nothing is taken from one;
        unreadable payloads are skipped."""
        if self._js is None:
            await self.wait_ready(timeout)
        assert self._js is not None
        physical = self.namespace.subject(subject)
        stream = await self._js.find_stream_name_by_subject(physical)
        found: list[E] = []
        seq = 1
        while True:
            try:
                raw = await self._js.get_msg(stream, seq=seq, subject=physical, next=True)
            except nats.js.errors.NotFoundError:
                return found
            with contextlib.suppress(DecodeError):
                found.append(payload_type.FromString(raw.data or b""))
            seq = (raw.seq or seq) + 1

    # -- consuming -------------------------------------------------------------------

    def subscribe(
        self,
        subject: str,
        durable: str,
        handler: Handler[E],
        *,
        payload_type: type[E] | None = None,
        deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
        ack_wait_s: float = 30.0,
        inactive_threshold_s: float | None = None,
        batch: int = 16,
    ) -> None:
        """Register a durable pull consumer. Consumers sharing ``durable`` split the work;
        a per-replica durable name gives every replica every event (fan-out). Long
        handlers (training jobs) want ``batch=1``: fetched messages wait their turn and
        their ack deadline runs meanwhile."""
        resolved = payload_type or PAYLOAD_TYPES[subject]
        sub = _Subscription(
            subject=subject,
            durable=self.namespace.durable(_safe_name(durable)),
            handler=handler,
            payload_type=resolved,
            deliver_policy=deliver_policy,
            ack_wait_s=ack_wait_s,
            inactive_threshold_s=inactive_threshold_s,
            batch=batch,
        )
        self._subs.append(sub)
        if self._ready.is_set():
            self._start_consumer(sub)

    def _start_consumer(self, sub: _Subscription[Any]) -> None:
        sub.task = asyncio.create_task(self._consume(sub), name=f"consume-{sub.durable}")

    async def _consume(self, sub: _Subscription[Any]) -> None:
        assert self._js is not None
        js = self._js
        config = ConsumerConfig(
            durable_name=sub.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=sub.ack_wait_s,
            max_deliver=self._max_deliver,
            deliver_policy=sub.deliver_policy,
            inactive_threshold=sub.inactive_threshold_s,
            filter_subject=self.namespace.subject(sub.subject),
        )

        async def bind() -> JetStreamContext.PullSubscription:
            subject = self.namespace.subject(sub.subject)
            stream = await js.find_stream_name_by_subject(subject)
            # Create the durable, or bring an existing one up to these settings: binding
            # alone would keep whatever the first replica to create it asked for (its ack
            # wait, max deliveries) however the service is configured now.
            await js.add_consumer(stream, config=config)
            return await js.pull_subscribe(subject, durable=sub.durable, stream=stream)

        psub = await retry_forever(f"subscribe {sub.subject} as {sub.durable}", bind)
        msgs: list[Msg] = []
        while not self._closed:
            try:
                msgs = await psub.fetch(batch=next_fetch_size(sub.batch, msgs), timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                msgs = []
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection blips: the client reconnects by itself
                log.debug("fetch on %s failed: %s", sub.subject, exc)
                msgs = []
                await asyncio.sleep(0.5)
            for msg in msgs:
                await self._handle(sub, msg)

    async def _handle(self, sub: _Subscription[Any], msg: Msg) -> None:
        deliveries = msg.metadata.num_delivered if msg.metadata else 1
        try:
            event = sub.payload_type.FromString(msg.data)
        except DecodeError as exc:
            await self._dead_letter(sub, msg, f"malformed payload: {exc}", deliveries)
            return
        headers = dict(msg.headers or {})
        ctx = telemetry.extract(headers)
        with tracer.start_as_current_span(
            f"process {msg.subject}", context=ctx, kind=trace.SpanKind.CONSUMER
        ) as span:
            span.set_attribute("messaging.system", "nats")
            span.set_attribute("messaging.destination.name", msg.subject)
            span.set_attribute("messaging.consumer.group.name", sub.durable)
            span.set_attribute("messaging.message.id", _event_id(event))
            try:
                logical = self.namespace.logical_subject(msg.subject)
                await sub.handler(event, Delivery(logical, deliveries, msg))
            except asyncio.CancelledError:
                # Shutting down mid-event: let it be redelivered promptly.
                with contextlib.suppress(Exception):
                    await msg.nak()
                raise
            except PermanentEventError as exc:
                await self._dead_letter(sub, msg, str(exc), deliveries)
                return
            except Exception as exc:
                span.record_exception(exc)
                if deliveries >= self._max_deliver:
                    await self._dead_letter(
                        sub, msg, f"failed {deliveries} times, last: {exc!r}", deliveries
                    )
                else:
                    log.warning(
                        "%s handler for %s failed (delivery %d/%d): %r; will retry",
                        sub.durable,
                        msg.subject,
                        deliveries,
                        self._max_deliver,
                        exc,
                    )
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=self._nak_delay_s * deliveries)
                return
        events_processed.add(1, {"subject": msg.subject, "consumer": sub.durable, "outcome": "ok"})
        with contextlib.suppress(Exception):
            await msg.ack()

    async def _dead_letter(
        self, sub: _Subscription[Any], msg: Msg, reason: str, deliveries: int
    ) -> None:
        log.error("dead-lettering %s for %s: %s", msg.subject, sub.durable, reason)
        events_processed.add(
            1, {"subject": msg.subject, "consumer": sub.durable, "outcome": "dead_lettered"}
        )
        headers = {k: v for k, v in (msg.headers or {}).items() if k != "Nats-Msg-Id"}
        headers.update(
            {
                "Ftops-Original-Subject": msg.subject,
                "Ftops-Consumer": sub.durable,
                "Ftops-Reason": reason[:1000],
                "Ftops-Deliveries": str(deliveries),
            }
        )
        assert self._js is not None
        try:
            logical = self.namespace.logical_subject(msg.subject)
            await self._js.publish(
                self.namespace.subject(f"{DEAD_LETTER_PREFIX}.{logical}"), msg.data, headers=headers
            )
        except Exception as exc:
            # Keep the message for a later try rather than lose it.
            log.error("could not dead-letter %s: %r", msg.subject, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self._nak_delay_s)
            return
        with contextlib.suppress(Exception):
            await msg.ack()


async def ensure_streams(
    js: JetStreamContext, *, replicas: int = 1, namespace: Namespace | None = None
) -> None:
    """Create our streams (the installation's, under its namespace), or bring an existing
    one's subjects, limits and replica count up to date."""
    ns = namespace or Namespace()
    for spec in STREAMS:
        name = ns.stream(spec.name)
        config = StreamConfig(
            name=name,
            subjects=[ns.subject(subject) for subject in spec.subjects],
            max_age=spec.max_age_s or None,
            max_msgs_per_subject=spec.max_msgs_per_subject or -1,
            num_replicas=replicas,
            duplicate_window=120,
            retention=RetentionPolicy.WORK_QUEUE if spec.work_queue else RetentionPolicy.LIMITS,
        )
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(config)
                continue
            except nats.js.errors.BadRequestError:
                pass  # another replica created it between our two calls
        await js.update_stream(config)


def _event_id(event: Message) -> str:
    meta = getattr(event, "meta", None)
    return str(meta.event_id) if meta is not None else ""


def _safe_name(name: str) -> str:
    """Consumer names may not contain '.', '*', '>' or whitespace."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def next_fetch_size(batch: int, last: list[Msg]) -> int:
    """How many messages the next fetch asks for: what the consumer has queued, up to
    ``batch``, and 1 when nothing is queued. A pull that asks for more than is there can
    hold the ones it got until its timeout while it waits for the rest (up to a second
    here, seen as a 440 ms delivery); a pull for one returns the moment one arrives."""
    metadata = last[-1].metadata if last else None
    queued = metadata.num_pending if metadata is not None and metadata.num_pending else 0
    return max(1, min(batch, queued))
