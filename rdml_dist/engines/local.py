"""The reference in-process cohort trainer: every student in this process, the same math as the Ray engine.

Students exchange nothing over a transport: their frames go straight into the same
:class:`~rdml_dist.coordinator.CohortCoordinator` that the Ray coordinator actor wraps, so the
two engines follow the same trajectory for the same config and seed.
"""

import time
from pathlib import Path

import torch
from tqdm import tqdm

from rdml_dist.config import ExperimentConfig
from rdml_dist.coordinator import CohortCoordinator
from rdml_dist.engines.progress import describe_epoch
from rdml_dist.run_directory import RunDirectory
from rdml_dist.student import Student


def train_local(config: ExperimentConfig, run_dir: Path, show_progress: bool = True) -> RunDirectory:
    """Train the cohort in this process; returns the finished run directory."""
    if config.runtime.torch_threads:
        torch.set_num_threads(config.runtime.torch_threads)
    students = [Student(config, index) for index in range(len(config.students))]
    coordinator = CohortCoordinator(config)
    for student in students:
        coordinator.register(student.info())
    run = RunDirectory(run_dir, config, engine="local")
    steps_per_epoch = coordinator.steps_per_epoch
    with tqdm(total=config.training.epochs * steps_per_epoch, disable=not show_progress, unit="step") as bar:
        for epoch in range(config.training.epochs):
            started = time.perf_counter()
            plans = [student.plan(epoch) for student in students]
            for step_in_epoch in range(steps_per_epoch):
                global_step = coordinator.step
                for student, plan in zip(students, plans):
                    coordinator.submit(student.forward(epoch, step_in_epoch, global_step, plan[step_in_epoch]))
                replies = coordinator.compute()
                for student in students:
                    student.apply(replies[student.name].grad)
                bar.update(1)
            evaluation = None
            for student in students:
                student.end_epoch()
                evaluation = coordinator.submit_eval(student.evaluate(epoch)) or evaluation
            if evaluation is None:
                raise RuntimeError(f"epoch {epoch} was not scored: the coordinator still waits for an evaluation")
            entry = run.record_epoch(epoch, coordinator.pop_records(coordinator.step), evaluation, time.perf_counter() - started)
            for student in students:
                run.save_checkpoint(student.name, student.state_dict())
            bar.set_postfix_str(describe_epoch(entry))
    return run
