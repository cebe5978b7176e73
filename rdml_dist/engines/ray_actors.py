"""Ray adapters: the async coordinator actor over the coordinator core, and the student actor over Student.

The coordinator must be async: each student's ``exchange`` call waits inside the actor until
every live student of the step has arrived, which a plain (one call at a time) actor would
deadlock on. Control calls (state, records, membership) have their own concurrency group so
that step traffic never starves them.
"""

import asyncio
import os
import threading
import time
from typing import Any

import ray
import torch

from rdml_dist.config import ExperimentConfig
from rdml_dist.coordinator import CohortCoordinator, EpochEvaluation, StepRecord
from rdml_dist.frames import EvalFrame, LogitsFrame, MimicryReply, StudentInfo
from rdml_dist.student import Student, resolve_device

CONTROL_GROUP = "control"


@ray.remote(num_cpus=0, concurrency_groups={CONTROL_GROUP: 4})
class CoordinatorActor:
    """Async barrier around :class:`CohortCoordinator`: one batched computation answers all students.

    Ray runs each concurrency group on its own event-loop thread, so every touch of the core
    happens under one lock (short, synchronous sections; never held across an ``await``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ExperimentConfig.model_validate(config)
        self.core = CohortCoordinator(self.config)
        self.lock = threading.Lock()
        self._step_results: dict[int, asyncio.Future[dict[str, MimicryReply]]] = {}

    def _step_future(self, step: int) -> "asyncio.Future[dict[str, MimicryReply]]":
        return self._step_results.setdefault(step, asyncio.get_running_loop().create_future())

    def _complete_if_ready(self) -> None:
        """Run the batched computation once the last live student of the step has arrived."""
        if self.core.is_complete():
            step = self.core.step
            self._step_future(step).set_result(self.core.compute())
            self._step_results.pop(step - 1, None)

    async def register(self, info: StudentInfo) -> None:
        with self.lock:
            self.core.register(info)

    async def exchange(self, frame: LogitsFrame) -> MimicryReply:
        """Submit one student's logits and wait for its mimicry gradient (the per-step barrier)."""
        with self.lock:
            try:
                self.core.submit(frame)
                future = self._step_future(frame.step)
            finally:
                self._complete_if_ready()
        replies = await asyncio.wait_for(asyncio.shield(future), timeout=self.config.runtime.ray.exchange_timeout_s)
        return replies[frame.student]

    async def submit_eval(self, frame: EvalFrame) -> None:
        with self.lock:
            self.core.submit_eval(frame)

    async def mark_dead(self, name: str) -> None:
        """Stop waiting for ``name``; a step that only waited for it completes now."""
        with self.lock:
            self.core.mark_dead(name)
            self._complete_if_ready()

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def evaluation(self, epoch: int, timeout_s: float) -> EpochEvaluation:
        """Wait until every live student has evaluated ``epoch`` and return the scores."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                if epoch in self.core.evaluations:
                    return self.core.evaluations[epoch]
            if time.monotonic() > deadline:
                raise TimeoutError(f"epoch {epoch} was not scored within {timeout_s} s")
            await asyncio.sleep(0.01)

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def pop_records(self, before_step: int) -> list[StepRecord]:
        with self.lock:
            return self.core.pop_records(before_step)

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def state(self) -> dict[str, Any]:
        with self.lock:
            return self.core.state()


@ray.remote
class StudentActor:
    """One student in its own process: loads its data, trains, exchanges logits with the coordinator."""

    def __init__(self, config: dict[str, Any], index: int, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        self.config = ExperimentConfig.model_validate(config)
        self.student = Student(self.config, index, resolve_device(self.config.runtime.device))

    def info(self) -> StudentInfo:
        """Registration data for the coordinator (where the actor runs is :meth:`placement`)."""
        return self.student.info()

    def placement(self) -> dict[str, Any]:
        """Node, GPU ids, CUDA_VISIBLE_DEVICES and torch device, for placement checks."""
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "device": str(self.student.device),
            "pid": os.getpid(),
        }

    def run_epoch(self, epoch: int, coordinator: "ray.actor.ActorHandle") -> int:
        """Train one epoch in lock-step with the cohort; returns the number of steps done."""
        plan = self.student.plan(epoch)
        first_step = epoch * len(plan)
        for step_in_epoch, indices in enumerate(plan):
            frame = self.student.forward(epoch, step_in_epoch, first_step + step_in_epoch, indices)
            sent = time.perf_counter()
            reply = ray.get(coordinator.exchange.remote(frame))
            self.student.apply(reply.grad, time.perf_counter() - sent)
        self.student.end_epoch()
        ray.get(coordinator.submit_eval.remote(self.student.evaluate(epoch)))
        return len(plan)

    def state_dict(self) -> dict[str, Any]:
        return self.student.state_dict()
