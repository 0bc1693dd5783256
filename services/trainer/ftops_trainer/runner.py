"""What one job does on the replica that took it:

dataset artifact -> validation -> pipeline stages -> holdout split -> replay mix ->
parent scores -> training (checkpointed, resumable) -> candidate scores -> evaluation gate
-> artifacts (adapter; the lineage's replay buffer) -> version registered (ready or
rejected) -> adapter.ready or adapter.rejected.

Heavy steps run in worker threads; every change to the job record happens on the event
loop, and ``report`` tells the manager to persist it.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from torch.multiprocessing.spawn import ProcessException

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2
from ftops_runtime import events, hashing
from ftops_runtime.artifacts import download_artifact
from ftops_runtime.errors import FtopsError
from ftops_runtime.retry import retry_forever
from ftops_trainer import artifacts
from ftops_trainer.dataset import Record, load_dataset, parse_jsonl
from ftops_trainer.evaluation import build_retention_set, evaluate_sets
from ftops_trainer.gang import GangFailed, Leader, Member
from ftops_trainer.gate import (
    GateConfig,
    HoldoutSplit,
    evaluate_gate,
    sample_records,
    split_holdout,
)
from ftops_trainer.intake import Intake, describe_skipped, skipped_lines
from ftops_trainer.outage import through_registry_outage
from ftops_trainer.replay import REPLAY_FILES, ReplayBuffer, lineage_buffer, mix_replay
from ftops_trainer.settings import TrainerSettings
from ftops_trainer.spec import pipeline_config, train_params
from ftops_trainer.store import REGISTRY_TIMEOUT_S, JobState
from ftops_trainer.training import (
    ADAPTER_FILES,
    NothingToTrain,
    TrainingStopped,
    TrainMetrics,
    TrainResult,
    train_adapter,
    train_member,
)
from ftops_trainer.weights_check import check_trained_weights

log = logging.getLogger(__name__)

# Any base model directory may ship what it knows as prompt/completion JSONL under this
# name; the trainer then measures retention on it (the tiny dev model ships one).
RETENTION_PROBE_FILE = "ftops_retention.jsonl"
# A gang member waits for node 0's go until the slot's deadline and this much longer.
_GO_SLACK_S = 10.0

Publish = Callable[[str, Message], Awaitable[None]]


class StopReason(enum.Enum):
    NONE = "none"
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"


class JobFailed(Exception):
    """Ends a job as FAILED with a message meant for the user."""


class TransientJobError(Exception):
    """A dependency is briefly unavailable: the job goes back to the queue and resumes
    from its checkpoint on the next delivery instead of failing."""


TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


def probe_split(records: Sequence[Record]) -> tuple[list[Record], list[Record]]:
    """Split the base model's probes once, by content: one half seeds the replay buffer,
    the other measures retention. Retention measured on replayed records would say
    nothing about forgetting."""
    replay: list[Record] = []
    held: list[Record] = []
    for r in records:
        key = f"{r.prompt}\x00{r.completion}"
        if r.messages:  # a chat's text is in its turns (prompt and completion are empty)
            key += "\x00" + json.dumps(r.messages)
        digest = hashlib.sha256(key.encode()).digest()
        (held if digest[0] % 2 else replay).append(r)
    return replay, held


@dataclass(frozen=True)
class _Inputs:
    data: bytes
    split: HoldoutSplit[Record]
    base: registry_pb2.BaseModel
    base_dir: Path
    parent_dir: Path | None
    buffer: ReplayBuffer
    probe_replay: list[Record]
    probe_held: list[Record]
    train_records: list[Record]


class JobRunner:
    def __init__(
        self,
        settings: TrainerSettings,
        registry: registry_pb2_grpc.RegistryServiceAsyncStub,
        publish: Publish,
        intake: Intake,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._publish = publish
        self._intake = intake
        self._fingerprints: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}

    async def run(
        self, job: trainer_pb2.Job, stop: threading.Event, report: Callable[[], None]
    ) -> None:
        """Run the job to an end state written into ``job``; raises only when stopped for
        a shutdown (the manager requeues it). A cancel ends it CANCELLED here."""
        work = self._settings.work_dir / job.job_id
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            await self._pipeline(job, work, stop, report)
        except TrainingStopped:
            if stop.is_set():
                return  # the manager knows why (cancel / shutdown) and ends the job
            raise
        except TransientJobError:
            raise  # the manager requeues the job (a gang that lost a node)
        except (JobFailed, FtopsError, NothingToTrain, ValueError) as exc:
            _fail(job, str(exc))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in TRANSIENT_CODES:
                raise TransientJobError(
                    f"registry unavailable ({exc.code().name}: {exc.details()})"
                ) from exc
            _fail(
                job,
                f"registry at {self._settings.registry_address} answered "
                f"{exc.code().name}: {exc.details()}",
            )
        except Exception as exc:
            log.exception("job %s crashed", job.job_id)
            _fail(job, f"internal error: {exc!r}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if job.state != JobState.JOB_STATE_FAILED:
            # Finished for good: its checkpoints are no longer needed.
            shutil.rmtree(self._settings.checkpoint_dir / job.job_id, ignore_errors=True)

    async def _inputs(
        self, job: trainer_pb2.Job, work: Path, report: Callable[[], None]
    ) -> _Inputs:
        """Everything training needs, from the job's dataset, base model and parent. Seeded
        throughout, so every node of a multi-node job derives the same inputs."""
        spec = job.spec
        # -- data ---------------------------------------------------------------------
        # Checked again here: a job queued before a refusal existed must not run either.
        data = await self._intake.fetch_dataset(spec.dataset_artifact_id, team=spec.team)
        parsed = await asyncio.to_thread(
            load_dataset,
            data,
            self._settings.max_bad_line_ratio,
            max_bytes=self._intake.max_bytes,
            category_key=spec.data.category_field or "category",
            timestamp_key=spec.data.timestamp_field or "timestamp",
        )
        from ftops_trainer.pipeline import run_pipeline

        cleaned = await asyncio.to_thread(run_pipeline, parsed.records, pipeline_config(spec))
        job.records_total = parsed.total
        job.records_skipped = len(parsed.errors)
        del job.skipped_lines[:]
        job.skipped_lines.extend(skipped_lines(parsed.errors))
        if parsed.errors:
            log.warning("job %s: %s", job.job_id, describe_skipped(job))
        del job.stages[:]
        job.stages.extend(
            trainer_pb2.StageReport(
                name=s.name,
                records_in=s.records_in,
                records_out=s.records_out,
                details={k: float(v) for k, v in s.details.items()},
            )
            for s in cleaned.stages
        )
        if not cleaned.records:
            raise JobFailed("no record survived the data pipeline: " + _stage_summary(job))
        split = split_holdout(
            cleaned.records, spec.gate.holdout_fraction, seed=spec.hyperparameters.seed
        )
        job.holdout_records = 0 if split.holdout_is_training else len(split.holdout)
        report()

        # -- base model, parent, replay buffer -----------------------------------------
        base = await self._intake.base_model(spec.base_model)
        base_dir = Path(base.uri)
        await self._check_base(base, base_dir)
        parent_dir: Path | None = None
        replay_dir: Path | None = None
        if spec.parent_version_id:
            parent = await self._intake.parent_version(
                spec.parent_version_id, base, team=spec.team, adapter=spec.adapter
            )
            parent_dir = await self._download_adapter(parent, work / "parent", spec.team)
            if parent.replay_artifact_id:
                replay_dir = work / "parent-replay"
                await download_artifact(
                    self._registry,
                    parent.replay_artifact_id,
                    replay_dir,
                    label=f"replay buffer of {parent.version_id}",
                    team=spec.team,
                )
        probes = await asyncio.to_thread(
            self._probes, base_dir, spec, base.fingerprint, self._settings.gate_general_probes
        )
        probe_replay, probe_held = probe_split(probes)
        buffer = lineage_buffer(
            replay_dir,
            probe_replay,
            capacity=spec.replay.capacity,
            seed=spec.hyperparameters.seed,
        )
        train_records = mix_replay(
            split.train, buffer, spec.replay.ratio, seed=spec.hyperparameters.seed
        )
        job.replay_records = len(train_records) - len(split.train)
        return _Inputs(
            data=data,
            split=split,
            base=base,
            base_dir=base_dir,
            parent_dir=parent_dir,
            buffer=buffer,
            probe_replay=probe_replay,
            probe_held=probe_held,
            train_records=train_records,
        )

    def _train_kwargs(self, job: trainer_pb2.Job, inputs: _Inputs, work: Path) -> dict[str, Any]:
        """What ``train_adapter`` (node 0) and ``train_member`` (the others) share."""
        hp = job.spec.hyperparameters
        return {
            "base_dir": inputs.base_dir,
            "records": inputs.train_records,
            "params": train_params(job.spec),
            "out_dir": work / "adapter",
            "base_model_name": inputs.base.name,
            "parent_adapter_dir": inputs.parent_dir,
            "checkpoint_dir": self._settings.checkpoint_dir / job.job_id,
            # Early stopping watches the held-out new data (never the training set).
            "eval_records": (
                inputs.split.holdout
                if hp.early_stopping_patience and not inputs.split.holdout_is_training
                else None
            ),
            # EWC estimates what matters to the parent on what the lineage knows.
            "replay_records": inputs.buffer.records or None,
            "world_size": max(1, hp.world_size),
        }

    async def _train(
        self,
        job: trainer_pb2.Job,
        kwargs: dict[str, Any],
        stop: threading.Event,
        on_metrics: Callable[[TrainMetrics], None],
    ) -> TrainResult:
        run = functools.partial(
            train_adapter, should_stop=stop.is_set, on_metrics=on_metrics, resume=True, **kwargs
        )
        if job.spec.hyperparameters.nodes <= 1:
            return await asyncio.to_thread(run)
        # Node 0 of a gang: recruit the members, then train with them.
        try:
            leader = await Leader.open(self._settings, job, self._publish)
        except Exception as exc:
            raise TransientJobError(f"could not open the job's rendezvous: {exc}") from exc
        try:
            await leader.wait_members(stop)
            return await asyncio.to_thread(run, node=leader.node())
        except GangFailed as exc:
            raise JobFailed(str(exc)) from exc
        except TrainingStopped:
            if stop.is_set():  # also how wait_members ends on a stop
                raise
            raise TransientJobError(
                "a member node stopped training (its replica shut down)"
            ) from None
        except ProcessException as exc:
            # A worker failed, here or because a member node died or hung (the
            # collectives time out): another attempt resumes from the checkpoint.
            raise TransientJobError(f"multi-node training failed: {exc}") from exc
        finally:
            leader.close()

    async def run_member(
        self, job: trainer_pb2.Job, slot: trainer_pb2.GangSlot, stop: threading.Event
    ) -> None:
        """Be node ``slot.node_rank`` of ``job``'s gang until the training ends. Node 0
        owns the job: its record, progress, checkpoints and results."""
        member = await asyncio.to_thread(Member.join, slot, self._settings.instance_id)
        if member is None:
            return
        work = self._settings.work_dir / f"{job.job_id}.node{slot.node_rank}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            try:
                inputs = await self._inputs(job, work, lambda: None)
                kwargs = self._train_kwargs(job, inputs, work)
            except Exception as exc:
                await asyncio.to_thread(member.fail, str(exc))
                raise
            await asyncio.to_thread(member.ready)
            wait = max(0.0, slot.deadline.ToSeconds() - time.time()) + _GO_SLACK_S
            if not await asyncio.to_thread(member.wait_go, wait, stop):
                log.info(
                    "job %s: node %d left the gang before it started", job.job_id, slot.node_rank
                )
                return
            log.info("job %s: training as node %d of %d", job.job_id, slot.node_rank, slot.nodes)
            await asyncio.to_thread(
                train_member,
                node=member.node(self._settings.distributed_timeout_s),
                should_stop=stop.is_set,
                **kwargs,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def _pipeline(
        self,
        job: trainer_pb2.Job,
        work: Path,
        stop: threading.Event,
        report: Callable[[], None],
    ) -> None:
        spec = job.spec
        loop = asyncio.get_running_loop()
        inputs = await self._inputs(job, work, report)
        split, buffer, base_dir = inputs.split, inputs.buffer, inputs.base_dir
        parent_dir, probe_held, data, base = (
            inputs.parent_dir,
            inputs.probe_held,
            inputs.data,
            inputs.base,
        )
        seeded = set(inputs.probe_replay)
        retention_set = build_retention_set(
            [r for r in buffer.records if r not in seeded],
            probe_held,
            size=self._settings.retention_set_size,
            seed=spec.hyperparameters.seed,
        )
        cutoff = spec.hyperparameters.cutoff_len

        # -- scores before: the parent (or the base model for a first version) ---------
        sets: dict[str, Sequence[Record]] = {"new": split.holdout}
        if retention_set:
            sets["retention"] = retention_set
        # Its own training records (a sample, new data only): did the version learn them.
        learned_set = sample_records(
            split.train, self._settings.gate_learned_set_size, spec.hyperparameters.seed
        )
        if learned_set:
            sets["learned"] = learned_set
        before = await asyncio.to_thread(
            evaluate_sets, base_dir, sets, adapter_dir=parent_dir, cutoff_len=cutoff
        )
        # The base model on its own held-out probes: the lineage-wide reference (for a
        # first version the parent *is* the base model, so there is nothing to add).
        if parent_dir is not None and probe_held:
            sets["probes"] = probe_held
            base_scores = await asyncio.to_thread(
                evaluate_sets, base_dir, {"probes": probe_held}, cutoff_len=cutoff
            )
            before["probes"] = base_scores["probes"]

        # -- training -----------------------------------------------------------------
        started = time.monotonic()

        def on_metrics(m: TrainMetrics) -> None:
            loop.call_soon_threadsafe(_apply_metrics, job, m, report)

        result = await self._train(job, self._train_kwargs(job, inputs, work), stop, on_metrics)
        # A diverged run fails here: never evaluated, uploaded or registered.
        await asyncio.to_thread(check_trained_weights, result.adapter_dir)
        job.records_used = result.examples
        job.records_truncated = result.truncated
        job.resumed_from_step = result.resumed_from_step
        report()

        # -- the gate -----------------------------------------------------------------
        after = await asyncio.to_thread(
            evaluate_sets, base_dir, sets, adapter_dir=result.adapter_dir, cutoff_len=cutoff
        )
        gate = evaluate_gate(
            GateConfig(
                min_retention=spec.gate.min_retention,
                max_new_loss_ratio=spec.gate.max_new_loss_ratio,
                enabled=not spec.gate.disabled,
                min_learned=self._settings.gate_min_learned,
            ),
            new_before=before["new"],
            new_after=after["new"],
            retention_before=before.get("retention"),
            retention_after=after.get("retention"),
            new_on_training_data=split.holdout_is_training,
            base_probes_before=before.get("probes"),
            base_probes_after=after.get("probes"),
            learned_before=before.get("learned"),
            learned_after=after.get("learned"),
        )
        evaluation = common_pb2.Evaluation(
            gate_passed=gate.passed, reasons=gate.reasons, metrics=gate.metrics
        )
        job.evaluation.CopyFrom(evaluation)
        report()
        rejected = not gate.passed and not spec.gate.disabled

        # -- artifacts and the version ------------------------------------------------
        buffer.add(split.train)
        buffer_dir = work / "replay"
        await asyncio.to_thread(buffer.save, buffer_dir)
        replay_files = artifacts.describe_files(buffer_dir, REPLAY_FILES)
        # Uploaded for the job's team: what lets its version use them, whatever else the
        # trainer's key may do.
        # A registry outage from here on is waited out (outage.py): the job has trained.
        outage_s = self._settings.registry_outage_s
        replay_artifact = await through_registry_outage(
            f"job {job.job_id}: uploading the replay buffer",
            lambda: artifacts.upload_artifact(
                self._registry, buffer_dir, replay_files, team=spec.team
            ),
            window_s=outage_s,
            stop=stop,
        )
        files = await asyncio.to_thread(artifacts.describe_files, result.adapter_dir, ADAPTER_FILES)
        artifact = await through_registry_outage(
            f"job {job.job_id}: uploading the adapter",
            lambda: artifacts.upload_artifact(
                self._registry, result.adapter_dir, files, team=spec.team
            ),
            window_s=outage_s,
            stop=stop,
        )
        register = functools.partial(
            self._registry.RegisterVersion,
            registry_pb2.RegisterVersionRequest(
                adapter=spec.adapter,
                team=spec.team,
                base_model=base.name,
                parent_version_id=spec.parent_version_id,
                artifact_id=artifact.artifact_id,
                job_id=job.job_id,
                dataset_fingerprint=hashlib.sha256(data).hexdigest(),
                method=spec.method,
                metrics={
                    "final_loss": result.final_loss,
                    "train_records": float(result.examples),
                    "train_steps": float(result.steps),
                    "train_seconds": round(time.monotonic() - started, 3),
                    **gate.metrics,
                },
                labels=dict(spec.labels),
                # A retried registration (redelivered job) returns the same version.
                idempotency_key=job.job_id,
                rejected=rejected,
                evaluation=evaluation,
                replay_artifact_id=replay_artifact.artifact_id,
                dataset_artifact_id=spec.dataset_artifact_id,
            ),
            timeout=REGISTRY_TIMEOUT_S,
        )
        version: registry_pb2.Version = await through_registry_outage(
            f"job {job.job_id}: registering its version", register, window_s=outage_s, stop=stop
        )
        job.version_id, job.version_number = version.version_id, version.number
        await self._announce(job, version, base, files, gate.reasons, gate.metrics, rejected)
        job.state = JobState.JOB_STATE_REJECTED if rejected else JobState.JOB_STATE_SUCCEEDED
        if rejected:
            job.error = "evaluation gate: " + "; ".join(gate.reasons)
        report()

    async def _announce(
        self,
        job: trainer_pb2.Job,
        version: registry_pb2.Version,
        base: registry_pb2.BaseModel,
        files: Sequence[common_pb2.ArtifactFile],
        reasons: Sequence[str],
        metrics: dict[str, float],
        rejected: bool,
    ) -> None:
        spec = job.spec
        meta = events.new_meta("trainer", self._settings.instance_id)
        # A redelivered job re-announces with the same id: JetStream stores it once.
        meta.event_id = f"{'rejected' if rejected else 'ready'}-{version.version_id}"
        event: Message
        if rejected:
            subject = events.ADAPTER_REJECTED
            event = events_pb2.AdapterRejected(
                meta=meta,
                version_id=version.version_id,
                adapter=version.adapter or spec.adapter,
                version_number=version.number,
                job_id=job.job_id,
                parent_version_id=spec.parent_version_id,
                team=spec.team,
                reasons=list(reasons),
                metrics=metrics,
            )
        else:
            subject = events.ADAPTER_READY
            event = events_pb2.AdapterReady(
                meta=meta,
                version_id=version.version_id,
                adapter=version.adapter or spec.adapter,
                version_number=version.number,
                base_model=base.name,
                base_model_fingerprint=base.fingerprint,
                files=list(version.files) or list(files),
                job_id=job.job_id,
                parent_version_id=spec.parent_version_id,
                team=spec.team,
            )

        async def announce() -> None:
            await self._publish(subject, event)

        # The version exists now; inference learns of it only through this event, so keep
        # trying through a NATS outage.
        await retry_forever(f"publish {subject} for {version.version_id}", announce)

    def _fingerprint(self, base_dir: Path) -> str:
        """Hashing a base model reads all of its weights: do it once per set of files, not
        once per job (a changed size or mtime means changed files, hashed again)."""
        stats = tuple(
            (path.name, path.stat().st_size, path.stat().st_mtime_ns)
            for pattern in hashing.FINGERPRINT_PATTERNS
            for path in sorted(base_dir.glob(pattern))
        )
        key = (str(base_dir.resolve()), stats)
        if key not in self._fingerprints:
            self._fingerprints[key] = hashing.model_fingerprint(base_dir)
        return self._fingerprints[key]

    async def _check_base(self, base: registry_pb2.BaseModel, base_dir: Path) -> None:
        try:
            local = await asyncio.to_thread(self._fingerprint, base_dir)
        except (FileNotFoundError, OSError) as exc:
            raise JobFailed(
                f"base model {base.name!r} registered at {base.uri!r} is not readable on "
                f"this trainer: {exc}"
            ) from exc
        if local != base.fingerprint:
            raise JobFailed(
                f"base model {base.name!r} at {base.uri!r} has fingerprint {local[:16]}..., "
                f"but the registry recorded {base.fingerprint[:16]}...: the files changed "
                "since it was registered; refusing to train an adapter for the wrong weights"
            )

    async def _download_adapter(self, parent: registry_pb2.Version, dest: Path, team: str) -> Path:
        files = await download_artifact(
            self._registry,
            parent.artifact_id,
            dest,
            label=f"parent version {parent.version_id}",
            expected=list(parent.files),
            team=team,
        )
        missing = set(ADAPTER_FILES) - {f.path for f in files}
        if missing:
            raise JobFailed(
                f"parent version {parent.version_id} artifact lacks {', '.join(sorted(missing))}"
            )
        return dest

    @staticmethod
    def _probes(
        base_dir: Path, spec: trainer_pb2.JobSpec, fingerprint: str, general: bool = True
    ) -> list[Record]:
        """The base model's own knowledge: its directory's probe file, else the
        general-knowledge questions it answers right (probes.py, filtered once per base
        model and cached), plus the job's."""
        records: list[Record] = []
        probe_file = base_dir / RETENTION_PROBE_FILE
        if probe_file.is_file():
            records += parse_jsonl(probe_file.read_bytes()).records
        elif general and fingerprint:
            from ftops_trainer.probes import general_probes

            records += general_probes(base_dir, fingerprint)
        if spec.gate.retention_jsonl:
            parsed = parse_jsonl(spec.gate.retention_jsonl)
            if parsed.errors:
                raise JobFailed("gate.retention_jsonl has bad lines:\n" + parsed.report())
            records += parsed.records
        return records


def _apply_metrics(job: trainer_pb2.Job, m: TrainMetrics, report: Callable[[], None]) -> None:
    job.step, job.total_steps, job.loss = m.step, m.total_steps, m.loss
    job.learning_rate = m.learning_rate
    job.tokens_per_second = m.tokens_per_second
    job.eta_seconds = m.eta_seconds
    report()


def _fail(job: trainer_pb2.Job, message: str) -> None:
    log.warning("job %s failed: %s", job.job_id, message)
    job.state = JobState.JOB_STATE_FAILED
    job.error = message


def _stage_summary(job: trainer_pb2.Job) -> str:
    return ", ".join(f"{s.name} {s.records_in}->{s.records_out}" for s in job.stages)
