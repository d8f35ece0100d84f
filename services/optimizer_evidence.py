"""What the optimizer's rules read: a version's definition and its recorded executions,
and the replay of a step's runs under a change (services/simulation.py does the graph).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from flowledger.domain.workflow import TOP, Workflow
from flowledger.projections.performance_samples import ExecutionSample, StepSample
from flowledger.services.optimizer_model import (
    MIN_GAIN_PCT,
    MoreData,
)
from flowledger.services.simulation import Prediction, Run, predict


@dataclass
class Evidence:
    """What the rules read: the version's definition and its recorded executions."""

    wf: Workflow
    document: dict[str, Any]
    pointers: dict[str, str]  # step id -> JSON pointer of the step in the document
    completed: list[ExecutionSample]
    failed: list[ExecutionSample]  # failed or timed out
    graph: dict[str, tuple[str, ...]]  # the top-level steps and their dependencies
    seed: str
    more_data: list[MoreData]

    def rng(self, salt: str) -> random.Random:
        """A PRNG for one rule and step: the same report for the same history."""
        return random.Random(f"{self.seed}:{salt}")

    @cached_property
    def completed_runs(self) -> list[Run]:
        """The completed executions as the simulation sees them (made once, read by every
        rule)."""
        return self._runs(self.completed)

    @cached_property
    def failed_runs(self) -> list[Run]:
        """The failed and timed-out executions as the simulation sees them."""
        return self._runs(self.failed)

    def _runs(self, samples: list[ExecutionSample]) -> list[Run]:
        return [
            Run(s.execution_id, s.duration, top_durations(self.wf, s, {}))
            for s in samples
            if s.duration is not None
        ]

    @cached_property
    def _by_step(self) -> dict[str, list[StepSample]]:
        found: dict[str, list[StepSample]] = defaultdict(list)
        for ex in (*self.completed, *self.failed):
            for st in ex.steps.values():
                if st.outcome in ("succeeded", "failed"):
                    found[st.step_id].append(st)
        return found

    def step_runs(self, step_id: str) -> list[StepSample]:
        """Every ended run of a step (all its instances) in the completed and failed ones."""
        return self._by_step.get(step_id, [])

    def simulate(
        self,
        kind: str,
        step_id: str,
        redraw: Callable[[StepSample, random.Random], float | None],
        *,
        failed: bool = False,
    ) -> Prediction:
        """Replay the completed (or failed) executions with each run of `step_id` given the
        duration `redraw` says (None: as recorded)."""
        samples = self.failed if failed else self.completed
        by_id = {s.execution_id: s for s in samples}

        def rewrite(run: Run, rng: random.Random) -> dict[str, float]:
            ex = by_id[run.execution_id]
            changed = {}
            for key, st in ex.steps.items():
                if st.step_id == step_id and st.duration is not None:
                    new = redraw(st, rng)
                    if new is not None:
                        changed[key] = new
            return top_durations(self.wf, ex, changed)

        return predict(
            self.failed_runs if failed else self.completed_runs,
            self.graph,
            self.rng(f"{kind}:{step_id}"),
            rewrite=rewrite,
            metric=(
                "time until a failed execution ends"
                if failed
                else "end-to-end duration of completed executions"
            ),
        )

    def need(self, check: str, step_id: str | None, have: int, need: int) -> bool:
        """Whether there are enough samples; records how many more runs it needs if not."""
        if have >= need:
            return True
        if have == 0 and step_id is not None:
            return False  # a step that never ran (a handler, an untaken branch): nothing to say
        self.more_data.append(MoreData(check, step_id, have, need, need - have))
        return False


def top_durations(wf: Workflow, ex: ExecutionSample, changed: dict[str, float]) -> dict[str, float]:
    """The top-level steps' durations of a recorded execution, with some step instances'
    durations changed: a nested change counts in its top-level step (in full inside a loop;
    inside a parallel step, only as far as it changes the slowest of its siblings)."""
    top = dict.fromkeys(wf.members[TOP], 0.0)
    for key, sample in ex.steps.items():
        if key in top and sample.duration is not None and sample.outcome != "skipped":
            top[key] = changed.get(key, sample.duration)
    for key, new in changed.items():
        st = ex.steps.get(key)
        if st is None or key in top or st.duration is None:
            continue
        old = st.duration
        node = wf.node(st.step_id)
        delta = new - old
        container = wf.node(node.scope) if node.scope in wf.nodes else None
        if container is not None and container.step.type == "parallel":
            prefix = key[: len(key) - len(st.step_id)]
            others = [
                o.duration
                for k, o in ex.steps.items()
                if k != key
                and o.duration is not None
                and k == prefix + o.step_id
                and o.step_id in wf.members[node.scope]
            ]
            slowest = max(others, default=0.0)
            delta = max(new, slowest) - max(old, slowest)
        ancestor = node
        while ancestor.scope != TOP and ancestor.scope in wf.nodes:
            ancestor = wf.node(ancestor.scope)
        if ancestor.step_id in top:
            top[ancestor.step_id] = max(0.0, top[ancestor.step_id] + delta)
    return top


def worth(prediction: Prediction) -> bool:
    return min(prediction.change_p50_pct, prediction.change_mean_pct) <= -MIN_GAIN_PCT
