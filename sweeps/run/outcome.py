"""What a sweep run left: its stages by how they ended."""

from __future__ import annotations

from dataclasses import dataclass, field

from sweeps.analysis.searches import CellSearch


@dataclass
class SweepOutcome:
    """Stage keys by how the sweep left them."""

    reused: set[str] = field(default_factory=set)
    trained: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    """Started, not finished and not stopped from outside."""
    interrupted_stages: set[str] = field(default_factory=set)
    """Started, not finished: stopped from outside (a signal, a lost driver)."""
    not_run: set[str] = field(default_factory=set)
    """Never started: an input failed, or the sweep was interrupted first."""
    interrupted: str | None = None
    """The signal that stopped the sweep (SIGINT, SIGTERM), if one did."""
    searches: list[CellSearch] = field(default_factory=list)
    """Each cell searched to its end by this run."""
    parent_run_id: str = ""
    """The sweep's parent run in MLflow."""
    names: dict[str, str] = field(default_factory=dict)
    """Stage key -> stage name, of the stages the run had to train."""
    restored: str | None = None
    """The Tune experiment this run restored (`resume`), if it had stages to train and restored one."""

    @property
    def complete(self) -> bool:
        """Every stage finished: nothing failed, was interrupted or left unstarted."""
        return not (self.failed or self.interrupted_stages or self.not_run or self.interrupted)

    def then(self, later: "SweepOutcome") -> "SweepOutcome":
        """This outcome followed by a later run's over more stages (the next round of seeds):
        trained by either, reused by neither, and the rest as the later run left it."""
        trained = self.trained | later.trained
        return SweepOutcome(reused=(self.reused | later.reused) - trained, trained=trained, failed=later.failed,
                            interrupted_stages=later.interrupted_stages, not_run=later.not_run,
                            interrupted=later.interrupted, searches=self.searches + later.searches,
                            parent_run_id=later.parent_run_id, names={**self.names, **later.names},
                            restored=self.restored or later.restored)
