"""The table every bench-perf section adds rows to: a figure against its baseline, their
ratio and the goal it should hold; and measures taken in alternating rounds, so that a
drift of the machine weighs on each alike."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable


@dataclass
class Row:
    section: str
    measure: str
    ours: float
    baseline: float
    baseline_is: str
    goal: str = ""  # e.g. "<= 1.3": what the ratio ours / baseline should be
    unit: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")

    @property
    def holds(self) -> str:
        if not self.goal:
            return ""
        op, bound = self.goal.split()
        return "yes" if (self.ratio <= float(bound) if op == "<=" else self.ratio >= float(bound)) else "NO"


def print_table(rows: list[Row]) -> None:
    print(f"{'section':9} {'measure':44} {'infinibrain':>12} {'baseline':>12} {'':18} {'ratio':>7} {'goal':>7} {'holds':>5}")
    for r in rows:
        print(f"{r.section:9} {r.measure + (' (' + r.unit + ')' if r.unit else ''):44} {r.ours:12.3f} {r.baseline:12.3f} "
              f"{r.baseline_is:18} {'x%.2f' % r.ratio:>7} {r.goal:>7} {r.holds:>5}")


def rounds_of(rounds: int, measures: dict[str, Callable[[], float]], rotate: bool = False) -> dict[str, list[float]]:
    """Each measure ``rounds`` times, alternating; with ``rotate``, in a new order each round."""
    figures: dict[str, list[float]] = {k: [] for k in measures}
    order = list(measures)
    for r in range(rounds):
        shift = r % len(order) if rotate else 0
        for key in order[shift:] + order[:shift]:
            figures[key].append(measures[key]())
    return figures


def median_rounds(rounds: int, measures: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each measure ``rounds`` times, alternating; the median of each."""
    return {k: statistics.median(v) for k, v in rounds_of(rounds, measures).items()}
