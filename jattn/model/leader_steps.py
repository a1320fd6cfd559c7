"""The steps of a process group's leader: each is announced to the followers, which run
the same step on their own devices, before it runs here.

What a follower receives (`jattn.distributed.group.StepChannel` carries each as its
dataclass): a `StepPlan` to execute, `CompileSteps` and `CompileSaves` at warm-up. A
layer-wise arrival never runs in a group: each process's store writes its own blocks
into the pool at once (`jattn.distributed.group_store`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax

from jattn.model.pool_steps import MeshSteps
from jattn.model.step_plan import StepOutput, StepPlan, with_fed_tokens


@dataclass(frozen=True)
class CompileSteps:
    """Compile every packed step (`ModelRunner.compile_steps`)."""


@dataclass(frozen=True)
class CompileSaves:
    """Compile the copies out of the pool of up to `max_blocks` blocks
    (`ModelRunner.compile_saves`)."""

    max_blocks: int


class LeaderSteps:
    """`MeshSteps` on the group's leader: `execute`, `compile_steps` and
    `compile_saves` first send their step through `group` (a
    `jattn.distributed.group.GroupLeader`, whose `step(message)` context also times the
    step until its results are ready), and logits come back on this process's first
    device, where sampling runs without the followers."""

    def __init__(self, steps: MeshSteps, group):
        self.steps = steps
        self.group = group
        self.logits_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def execute(self, plan: StepPlan) -> StepOutput:
        """Announces `plan` as plain data (its fed tokens read to the host, nothing
        drawn), runs it, and draws its tokens here from the logits."""
        if plan.arrival is not None:
            raise RuntimeError("a step with KV arriving layer by layer does not run in a "
                               "group of processes: each process's store writes its own "
                               "blocks into the pool at once")
        announced = dataclasses.replace(with_fed_tokens(plan), draws=())
        with self.group.step(announced):
            output = self.steps.execute(announced)
            logits = output.logits
            if logits is not None:
                logits = jax.block_until_ready(logits).addressable_data(0)
        tokens = self.steps.draw(logits, plan.draws) if plan.draws else None
        return StepOutput(logits, output.saved, tokens)

    def compile_steps(self) -> int:
        with self.group.step(CompileSteps(), compiles=True):
            shapes = self.steps.compile_steps()  # it waits for the compiled steps
        self.steps.compile_draws(self.logits_sharding)
        return shapes

    def compile_arrivals(self) -> int:
        """Nothing arrives layer by layer in a group: no shape to compile."""
        return 0

    def compile_saves(self, max_blocks: int) -> int:
        with self.group.step(CompileSaves(max_blocks), compiles=True):
            return self.steps.compile_saves(max_blocks)
