"""Results of the conformance kit: one :class:`CheckResult` per check, model, dtype and layer."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterator

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


class ConformanceError(AssertionError):
    """A backend failed one or more conformance checks (the message lists every failure)."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One verdict. ``layer`` names the state layer (``s0``...), the parameter (``W01``...) or
    the item of a contract check; ``message`` says what was measured against what was allowed."""

    name: str
    model: str
    flavor: str
    dtype: str
    layer: str
    status: str
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    @property
    def skipped(self) -> bool:
        return self.status == SKIPPED

    def where(self) -> str:
        parts = [self.name]
        if self.model:
            parts.append(self.model)
        if self.flavor or self.dtype:
            parts.append(f"[{', '.join(p for p in (self.flavor, self.dtype) if p)}]")
        if self.layer:
            parts.append(self.layer)
        return " ".join(parts)

    def __str__(self) -> str:
        if self.failed:  # a failure's message already says where
            return f"{self.status.upper():7} {self.message}"
        return f"{self.status.upper():7} {self.where()}: {self.message}"


@dataclasses.dataclass
class Report:
    """Everything one run of :func:`epbench.testing.check_backend` found."""

    backend: str
    reference: str
    results: list[CheckResult] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def __iter__(self) -> Iterator[CheckResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i):
        return self.results[i]

    @property
    def passed(self) -> list[CheckResult]:
        return [r for r in self.results if r.passed]

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.failed]

    @property
    def failures(self) -> list[CheckResult]:
        return self.failed

    @property
    def skipped(self) -> list[CheckResult]:
        return [r for r in self.results if r.skipped]

    @property
    def ok(self) -> bool:
        return not self.failed

    def select(self, name: str | None = None, status: str | None = None) -> list[CheckResult]:
        return [r for r in self.results
                if (name is None or r.name == name) and (status is None or r.status == status)]

    def summary(self) -> str:
        counts = Counter(r.status for r in self.results)
        ref = f" (reference {self.reference})" if self.reference else ""
        return (f"{self.backend}{ref}: {counts[PASSED]} passed, {counts[FAILED]} failed, "
                f"{counts[SKIPPED]} skipped in {self.seconds:.1f} s")

    def format(self, verbose: bool = False) -> str:
        """The summary, then every failure; with ``verbose`` also every pass and skip."""
        lines = [self.summary()]
        shown = self.results if verbose else self.failed
        lines += [f"  {r}" for r in shown]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def raise_for_failures(self) -> None:
        """Raise :class:`ConformanceError` listing every failure, if there is one."""
        if self.failed:
            raise ConformanceError(self.format())

    def to_records(self) -> list[dict]:
        return [dataclasses.asdict(r) for r in self.results]
