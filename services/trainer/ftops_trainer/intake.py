"""Submit-time checks and dataset intake: everything that can refuse a job does so here,
while the user still waits on SubmitJob, and nothing is stored for a refused job.

The dataset becomes a content-addressed registry artifact, so any replica can run the job
and the version's lineage names exactly the data it learned from.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2
from ftops_models.check import WEIGHT_FILES
from ftops_models.memory import check_memory
from ftops_runtime.artifacts import download_artifact
from ftops_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from ftops_trainer import access, artifacts
from ftops_trainer.dataset import LineError, load_dataset
from ftops_trainer.recipes import base_recipe, fit_epochs, model_type, with_recipe
from ftops_trainer.settings import TrainerSettings
from ftops_trainer.store import REGISTRY_TIMEOUT_S

DATASET_FILE = "dataset.jsonl"
# The job record names this many skipped lines; records_skipped counts them all.
SKIPPED_LINES_SHOWN = 20


def skipped_lines(errors: Sequence[LineError]) -> list[trainer_pb2.SkippedLine]:
    """The first skipped lines with why, for the job record (GetJob, WatchJob, the CLI)."""
    return [
        trainer_pb2.SkippedLine(line=e.line, reason=e.reason) for e in errors[:SKIPPED_LINES_SHOWN]
    ]


def describe_skipped(job: trainer_pb2.Job) -> str:
    """One line for the trainer's log: the count, then the lines the record names."""
    shown = "; ".join(f"line {s.line}: {s.reason}" for s in job.skipped_lines)
    more = job.records_skipped - len(job.skipped_lines)
    tail = f"; and {more} more" if more > 0 else ""
    return f"{job.records_skipped} of {job.records_total} dataset lines skipped ({shown}{tail})"


@dataclass(frozen=True)
class Prepared:
    spec: trainer_pb2.JobSpec  # the dataset replaced by its artifact id, the team filled in
    records_total: int
    skipped: list[LineError]


class Intake:
    def __init__(
        self, settings: TrainerSettings, registry: registry_pb2_grpc.RegistryServiceAsyncStub
    ) -> None:
        self._settings = settings
        self._registry = registry

    @property
    def max_bytes(self) -> int:
        return int(self._settings.max_dataset_mb * 1024 * 1024)

    async def prepare(self, spec: trainer_pb2.JobSpec) -> Prepared:
        # First what the job's team may use: nothing of another team's is read before.
        team = await access.job_team(self._registry, spec.adapter, spec.team)
        base = await self.base_model(spec.base_model)
        # The base model's recipe (by its size) for every field the job leaves unset.
        asked, recipe = spec, await asyncio.to_thread(base_recipe, Path(base.uri))
        if recipe is not None:
            spec = with_recipe(spec, recipe, await asyncio.to_thread(model_type, Path(base.uri)))
        if spec.parent_version_id:
            await self.parent_version(spec.parent_version_id, base, team=team, adapter=spec.adapter)
        await asyncio.to_thread(self._check_method, spec, base)
        data = await self.dataset_bytes(spec, team)
        # InvalidArgument with every bad line numbered, before anything is stored.
        parsed = await asyncio.to_thread(
            load_dataset,
            data,
            self._settings.max_bad_line_ratio,
            max_bytes=self.max_bytes,
            category_key=spec.data.category_field or "category",
            timestamp_key=spec.data.timestamp_field or "timestamp",
        )
        out = trainer_pb2.JobSpec()
        out.CopyFrom(spec)
        out.team = team
        fit_epochs(asked, out, recipe, len(parsed.records))
        if not spec.parent_version_id and not spec.lora.target_modules:
            # The job record shows the targets it trains: the architecture's default, or
            # every linear layer where the recipe asks for that (its Llama-family names
            # aside, which with_recipe filled in).
            from ftops_trainer.targets import default_targets_for

            all_linear = recipe is not None and recipe.all_linear and spec.method in ("", "lora")
            defaults = await asyncio.to_thread(
                default_targets_for, spec.method or "lora", Path(base.uri), all_linear=all_linear
            )
            out.lora.target_modules.extend(defaults)
        if spec.WhichOneof("dataset") != "dataset_artifact_id":
            out.dataset_artifact_id = await self.store_dataset(data, team=team)
        return Prepared(out, parsed.total, parsed.errors)

    def _check_method(self, spec: trainer_pb2.JobSpec, base: registry_pb2.BaseModel) -> None:
        """The method against the device and the base model's shape (config only, no
        weights): an unsupported combination fails here, not mid-training. A parent's
        compatibility is checked when the job runs (its adapter is downloaded there)."""
        from ftops_trainer.methods import qlora_problem, validate_method
        from ftops_trainer.params import validate_training
        from ftops_trainer.serving import serving_problem
        from ftops_trainer.spec import effective_spec, train_params

        params = train_params(effective_spec(spec, self._settings))
        if params.method == "qlora" and (problem := qlora_problem()):
            raise FailedPrecondition(problem)
        if problem := serving_problem(params, self._settings.serving_backend):
            raise FailedPrecondition(problem)
        problems = validate_training(params)
        base_dir = Path(base.uri)
        if not spec.parent_version_id and (base_dir / "config.json").is_file():
            problems += validate_method(params, base_dir)
        if any((base_dir / name).is_file() for name in WEIGHT_FILES):
            # Before a job loads it (float32 on this trainer): too large is said with the
            # estimate now, not as an out-of-memory kill mid-job.
            check_memory(base_dir, limit_mb=self._settings.max_model_memory_mb, dtype="float32")
        if problems:
            raise InvalidArgument("invalid job spec: " + "; ".join(problems))

    async def base_model(self, name: str) -> registry_pb2.BaseModel:
        try:
            base: registry_pb2.BaseModel = await self._registry.GetBaseModel(
                registry_pb2.GetBaseModelRequest(name=name), timeout=REGISTRY_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"base model {name!r} is not registered in the registry "
                    "(inference registers the model it serves at start)"
                ) from exc
            raise
        return base

    async def parent_version(
        self, version_id: str, base: registry_pb2.BaseModel, *, team: str, adapter: str
    ) -> registry_pb2.Version:
        """The parent, once it is known to be a version of ``team``'s ``adapter``."""
        try:
            parent: registry_pb2.Version = await self._registry.GetVersion(
                registry_pb2.GetVersionRequest(version_id=version_id), timeout=REGISTRY_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in access.HIDDEN:
                missing = exc.code() == grpc.StatusCode.NOT_FOUND
                what = f"parent version {version_id!r}"
                raise access.not_the_teams(what, team, missing=missing) from exc
            raise
        access.check_parent(parent, ref=version_id, team=team, adapter=adapter)
        if parent.base_model_fingerprint and parent.base_model_fingerprint != base.fingerprint:
            raise FailedPrecondition(
                f"parent version {parent.version_id} was trained on base model "
                f"{parent.base_model!r} (fingerprint {parent.base_model_fingerprint[:16]}...), "
                f"not on {base.name!r} ({base.fingerprint[:16]}...)"
            )
        if parent.state == "rejected":
            raise FailedPrecondition(
                f"parent version {parent.version_id} failed its evaluation gate: continue "
                "from an accepted version"
            )
        return parent

    async def dataset_bytes(self, spec: trainer_pb2.JobSpec, team: str) -> bytes:
        which = spec.WhichOneof("dataset")
        if which == "dataset_jsonl":
            data = spec.dataset_jsonl
        elif which == "dataset_uri":
            data = await asyncio.to_thread(self._read_uri, spec.dataset_uri)
        else:
            data = await self.fetch_dataset(spec.dataset_artifact_id, team=team)
        if len(data) > self.max_bytes:
            raise InvalidArgument(
                f"dataset is {len(data) / 2**20:.1f} MiB, over the "
                f"{self._settings.max_dataset_mb:g} MiB limit (FTOPS_MAX_DATASET_MB)"
            )
        return data

    def _read_uri(self, uri: str) -> bytes:
        roots = self._settings.allowed_dataset_dirs()
        if not roots:
            raise InvalidArgument(
                "dataset_uri is disabled on this trainer (FTOPS_DATASET_DIRS is empty): send "
                "the data inline (dataset_jsonl) or as a registry artifact"
            )
        path = Path(uri.removeprefix("file://")).resolve()
        if not any(path.is_relative_to(root) for root in roots):
            raise InvalidArgument(
                f"dataset_uri {uri!r} is outside the trainer's dataset directories "
                f"({', '.join(str(r) for r in roots)})"
            )
        try:
            if path.stat().st_size > self.max_bytes:
                raise InvalidArgument(
                    f"dataset {uri!r} is over the {self._settings.max_dataset_mb:g} MiB limit"
                )
            return path.read_bytes()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read dataset_uri {uri!r}: {exc.strerror or exc}"
            ) from exc

    async def fetch_dataset(self, artifact_id: str, *, team: str) -> bytes:
        """The dataset artifact, downloaded on behalf of ``team`` ("" only for teamless jobs
        of platform admins): the registry refuses one the team may not use."""
        with tempfile.TemporaryDirectory(dir=self._settings.work_dir) as tmp:
            try:
                files = await download_artifact(
                    self._registry,
                    artifact_id,
                    Path(tmp),
                    label=f"dataset artifact {artifact_id}",
                    team=team,
                )
            except (NotFound, PermissionDenied) as exc:
                what = f"dataset artifact {artifact_id!r}"
                missing = isinstance(exc, NotFound)
                raise access.not_the_teams(what, team, missing=missing) from exc
            if [f.path for f in files] != [DATASET_FILE]:
                raise InvalidArgument(f"artifact {artifact_id} is not a dataset ({DATASET_FILE})")
            return await asyncio.to_thread((Path(tmp) / DATASET_FILE).read_bytes)

    async def store_dataset(self, data: bytes, *, team: str = "") -> str:
        with tempfile.TemporaryDirectory(dir=self._settings.work_dir) as tmp:
            await asyncio.to_thread((Path(tmp) / DATASET_FILE).write_bytes, data)
            files = artifacts.describe_files(Path(tmp), [DATASET_FILE])
            artifact = await artifacts.upload_artifact(self._registry, Path(tmp), files, team=team)
        return artifact.artifact_id
