"""End to end: a version trained with a method other than LoRA (prefix tuning) is trained by
the trainer service, registered, hot-loaded by the inference service, released on an
alias and answers through the gateway exactly what PEFT's PeftModel answers with the
artifact the replica verified."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_devstack.demo import EventLog, ask
from ftops_devstack.stack import Stack
from ftops_runtime.client import channel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ALIAS = "prefix-bot"


def _reference(model_dir: Path, adapter_dir: Path | None, prompt: str, max_tokens: int) -> str:
    """Greedy answer of PeftModel with the adapter (of the base model alone without)."""
    from peft import PeftModel

    import ftops_tinymodel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, tok = ftops_tinymodel.load(model_dir)
        model: Any = base
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(base, str(adapter_dir))  # type: ignore[arg-type]
        model.eval()
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id or 0,
            )
        return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    finally:
        torch.set_num_threads(threads)


async def test_a_prefix_tuned_version_is_released_and_answers_as_peft_does(
    stack: Stack,
) -> None:
    from ftops_tinymodel import new_facts

    facts = new_facts()[:8]
    dataset = "\n".join(json.dumps(f) for f in facts).encode()
    events = EventLog(lambda line: None)
    await events.start(stack.nats_url)
    try:
        async with (
            channel(stack.address("trainer"), api_key=stack.api_key) as tch,
            channel(stack.address("gateway"), api_key=stack.api_key) as gch,
        ):
            trainer = trainer_pb2_grpc.TrainerServiceStub(tch)
            gateway = gateway_pb2_grpc.GatewayServiceStub(gch)
            spec = trainer_pb2.JobSpec(
                adapter=ALIAS,
                team="demo",
                base_model="tiny-llama",
                method="prefix_tuning",
                lora=trainer_pb2.LoraConfig(num_virtual_tokens=4),
                dataset_jsonl=dataset,
                hyperparameters=trainer_pb2.Hyperparameters(
                    max_steps=4, learning_rate=0.1, batch_size=4
                ),
                # Four steps learn little: the gate reports, the test looks at serving.
                gate=trainer_pb2.GateConfig(disabled=True),
            )
            job = await trainer.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec))
            async for update in trainer.WatchJob(trainer_pb2.GetJobRequest(job_id=job.job_id)):
                job = update
            assert job.state == events_pb2.JOB_STATE_SUCCEEDED, job.error
            await events.wait_loaded(job.version_id)
            await gateway.SetRoute(
                gateway_pb2.SetRouteRequest(alias=ALIAS, version_id=job.version_id)
            )
            prompt = facts[0]["prompt"]
            deadline = time.monotonic() + 30
            while True:  # the route reaches the gateway's table within moments
                try:
                    answer = await ask(gateway, ALIAS, prompt)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
                    continue
                if answer.version_id == job.version_id or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert answer.version_id == job.version_id
            verified = stack.workdir / "adapter-cache" / job.version_id
            expected = _reference(stack.model_dir, verified, prompt, max_tokens=8)
            assert answer.text == expected
            # The prefix changes the answer: the replica did not answer with the base alone.
            assert expected != _reference(stack.model_dir, None, prompt, max_tokens=8)
    finally:
        await events.close()
