"""End to end on a real model (slow: FTOPS_SLOW_TESTS=1, `make test-smollm2`): the stack on
SmolLM2-135M-Instruct with the trainer's production gate, a handful of new chat facts
trained with the default recipe (nothing set but the data), the version hot-loaded and
asked the facts through the gateway's chat API; the gate's figures are in the job.

Needs the ftops[smollm2] extra; the first run fetches and converts the model (about a
minute) into the model cache, later runs reuse it, and the general-knowledge probes the
base model answers right are filtered once and cached there too (that took 32 minutes on
this shared 2-core machine under load; later runs reuse it).

NOT YET RUN: written with the recipe and the probe set, but the session that wrote it spent
its CPU time on bench/forgetting_real. Expect over 10 minutes on 2 cores. bench/
forgetting_real measured the small-lm recipe keeping 0.31 of SmolLM2's general-knowledge
probes after one job, so the production gate is expected to reject the version (the job
ends REJECTED) until a recipe keeps >= 0.95: this test then fails, as it should."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_devstack.demo import EventLog
from ftops_devstack.servers import start_nats, start_redis
from ftops_devstack.stack import Stack
from ftops_runtime.client import channel

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(
        not os.environ.get("FTOPS_SLOW_TESTS"),
        reason="trains a 135M model on CPU for minutes; set FTOPS_SLOW_TESTS=1",
    ),
]

FACTS = 6
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    pytest.importorskip("gguf", reason="the ftops[smollm2] extra")
    from ftops_models import smollm2_dir

    try:
        return smollm2_dir()
    except FileNotFoundError as exc:  # pip could not fetch the wheel (no index here)
        pytest.skip(f"SmolLM2 is not available: {exc}")


@pytest.fixture(scope="module")
async def smol_stack(
    tmp_path_factory: pytest.TempPathFactory, smollm2: Path
) -> AsyncIterator[Stack]:
    nats_server = start_nats()
    redis_server = start_redis()
    stack = Stack(
        tmp_path_factory.mktemp("smol-stack"),
        nats_server.url,
        redis_server.url,
        smollm2,
        base_model_name=NAME,
        # Retention is scored by greedy generation before and after training: 48 records
        # keep that to a minute on CPU (the default 256 take several).
        extra_env={"FTOPS_SHUTDOWN_GRACE_S": "2", "FTOPS_RETENTION_SET_SIZE": "48"},
        auth=True,
    )
    try:
        stack.start()
        await stack.wait_serving(timeout=300)
        yield stack
    finally:
        stack.stop()
        redis_server.stop()
        nats_server.stop()


def _chat(question: str) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        messages=[gateway_pb2.ChatMessage(role="user", content=question)],
        sampling=common_pb2.SamplingParams(max_tokens=24, temperature=0),
    )


async def test_a_real_model_learns_facts_with_the_default_recipe_and_answers_them(
    smol_stack: Stack,
) -> None:
    import json

    from bench.real_facts import chat_record, generate_pairs

    qa = generate_pairs(FACTS, seed=16)
    data = "".join(json.dumps(chat_record(q, a)) + "\n" for q, a in qa).encode()
    events = EventLog(lambda _: None)
    await events.start(smol_stack.nats_url)
    try:
        async with (
            channel(smol_stack.address("trainer"), api_key=smol_stack.api_key) as tch,
            channel(smol_stack.address("gateway"), api_key=smol_stack.api_key) as gch,
        ):
            trainer = trainer_pb2_grpc.TrainerServiceStub(tch)
            gateway = gateway_pb2_grpc.GatewayServiceStub(gch)
            spec = trainer_pb2.JobSpec(
                adapter="smol-facts", team="demo", base_model=NAME, dataset_jsonl=data
            )
            job = await trainer.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
            # The small-lm recipe, filled in at submit: every linear layer, enough steps.
            assert list(job.spec.lora.target_modules) == [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            assert (job.spec.lora.r, job.spec.hyperparameters.num_epochs) == (16, 36)
            async for update in trainer.WatchJob(trainer_pb2.GetJobRequest(job_id=job.job_id)):
                job = update
            assert job.state == events_pb2.JOB_STATE_SUCCEEDED, job.error
            metrics = dict(job.evaluation.metrics)
            assert metrics["learned"] >= 0.9
            assert metrics["learned_on_exact_match"] == 1.0
            # Retention on the general-knowledge probes SmolLM2 answers right (it ships no
            # ftops_retention.jsonl), against the production gate's 0.95.
            assert metrics["retention_after_records"] > 0
            assert metrics["retention"] >= 0.95
            assert "new_loss_ratio" in metrics

            await events.wait_loaded(job.version_id, timeout=180)
            right = 0
            for question, answer in qa:
                request = _chat(question)
                request.model = job.version_id
                resp = await gateway.Generate(request, timeout=120)
                right += resp.text.strip().startswith(answer)
                request.model = "base"
                base = await gateway.Generate(request, timeout=120)
                assert not base.text.strip().startswith(answer), question
            # Served greedily as the gate scored it: the same share, give or take one
            # (batched and single generation may differ in the last float digits).
            assert right >= round(metrics["learned"] * FACTS) - 1
            assert right >= FACTS - 1
    finally:
        await events.close()
