"""The contract of a boot step: a name declared once, typed inputs (a frozen dataclass of
what it needs), a typed result (its ChangeSet, and what later steps need). Steps never read
each other's state: `agent.run` passes one step's result into the next one's inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from agent.apply import ChangeSet
from agent.errors import BootstrapError


@dataclass(frozen=True, kw_only=True)
class StepResult:
    changes: ChangeSet = field(default_factory=ChangeSet)
    note: str = ""  # one line for the record and the logs; nothing reads it back


In = TypeVar("In")
Out = TypeVar("Out", bound=StepResult)


class Step(Generic[In, Out]):
    def __init__(self, name: str, body: Callable[[In], Out]) -> None:
        self.name = name
        self.body = body

    def __call__(self, inputs: In) -> Out:
        return self.body(inputs)


def step(name: str) -> Callable[[Callable[[In], Out]], Step[In, Out]]:
    """Declare a step: `@step("preflight")` over `def check(inputs: Inputs) -> Result`."""

    def declare(body: Callable[[In], Out]) -> Step[In, Out]:
        return Step(name, body)

    return declare


@dataclass(frozen=True)
class StepReport:
    """What the run record, the logs and the dry-run plan show of one step that ran."""

    name: str
    changes: ChangeSet
    note: str = ""
    error: str | None = None

    @property
    def outcome(self) -> str:
        if self.error is not None:
            return "failed"
        return "changed" if self.changes.writes else "unchanged"


class Ledger:
    """Runs steps in the order asked and keeps a report of each, the failed one included."""

    def __init__(self) -> None:
        self.reports: list[StepReport] = []

    def __call__(self, unit: Step[In, Out], inputs: In) -> Out:
        try:
            result = unit(inputs)
        except BootstrapError as err:
            self.reports.append(StepReport(unit.name, ChangeSet(), error=str(err)))
            raise
        self.reports.append(StepReport(unit.name, result.changes, result.note))
        return result
