"""A chain's accuracy-versus-bytes frontiers as typed results (JSON by `to_json`), their Pareto fronts, look-ups.

Each point type lists its fields in the order the published JSON (docs/results/*.json) writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, TypeVar


class Point(Protocol):
    """Any point of a frontier: accuracy, and bytes as a share of what cloud-only serving sends."""

    @property
    def accuracy(self) -> float: ...

    @property
    def bytes_vs_cloud_only(self) -> float: ...


@dataclass(frozen=True)
class PolicyPoint:
    """Where a policy without a setting lands: cloud-only, device-only, the oracle."""

    accuracy: float
    bytes_vs_cloud_only: float


@dataclass(frozen=True)
class BetaPoint:
    """RecServe at one β."""

    beta: float
    accuracy: float
    bytes_vs_cloud_only: float


@dataclass(frozen=True)
class ThresholdPoint:
    """Fixed thresholds, one per forwarding tier (CasServe's grid)."""

    accuracy: float
    bytes_vs_cloud_only: float
    thresholds: tuple[float, ...]


@dataclass(frozen=True)
class BudgetPoint:
    """CasServe with thresholds tuned on the train split for a byte budget (share of cloud-only bytes)."""

    budget: float
    accuracy: float
    bytes_vs_cloud_only: float


@dataclass(frozen=True)
class TargetPoint:
    """A target-driven policy at one target: a byte budget (budget) or an accuracy gap (quality)."""

    target: float
    accuracy: float
    bytes_vs_cloud_only: float


@dataclass(frozen=True)
class BenchmarkFrontier:
    """The frontiers of one benchmark (or of all, `overall`), and the points of the policies without a setting."""

    recserve: tuple[BetaPoint, ...]
    casserve_hindsight: tuple[ThresholdPoint, ...]  # the Pareto front of the grid on the evaluated split itself
    casserve_train: tuple[BudgetPoint, ...]  # empty without a train split
    cloud_only: PolicyPoint
    device_only: PolicyPoint
    oracle: PolicyPoint
    # The target-driven policies, when swept (`SweepRequest.targets`); `budget_tuned` also needs a train split.
    budget: tuple[TargetPoint, ...] = ()
    quality: tuple[TargetPoint, ...] = ()
    budget_tuned: tuple[TargetPoint, ...] = ()

    def to_json(self) -> dict[str, object]:
        fields = asdict(self)
        for optional in ("budget", "quality", "budget_tuned"):
            if not fields[optional]:  # curves not swept are left out, not written empty
                del fields[optional]
        return fields


@dataclass(frozen=True)
class BudgetTracking:
    """Bytes so far as a share of what cloud-only would have sent for the same requests, along two streams."""

    target: float  # the byte budget held
    drifting: tuple[tuple[int, float], ...]  # (requests served, share), the benchmarks one after another
    shuffled: tuple[tuple[int, float], ...]  # the same, the requests shuffled

    def to_json(self) -> dict[str, object]:
        # Counts as floats: the published JSON has always written them so.
        return {
            "target": self.target,
            **{name: [[float(n), share] for n, share in points] for name, points in self.streams().items()},
        }

    def streams(self) -> dict[str, tuple[tuple[int, float], ...]]:
        return {"drifting": self.drifting, "shuffled": self.shuffled}


@dataclass(frozen=True)
class ChainFrontier:
    """Everything the sweep of one chain gives: per benchmark (and `overall`, last) its frontiers."""

    chain: tuple[str, ...]
    split: str
    window: int
    benchmarks: dict[str, BenchmarkFrontier]
    fill_cap_tuned_on_train: float | None = None  # the budget policy's, with targets and a train split
    budget_tracking: BudgetTracking | None = None  # with targets

    def to_json(self) -> dict[str, object]:
        result: dict[str, object] = {
            "chain": list(self.chain),
            "split": self.split,
            "window": self.window,
            "benchmarks": {name: frontier.to_json() for name, frontier in self.benchmarks.items()},
        }
        if self.fill_cap_tuned_on_train is not None:
            result["fill_cap_tuned_on_train"] = self.fill_cap_tuned_on_train
        if self.budget_tracking is not None:
            result["budget_tracking"] = self.budget_tracking.to_json()
        return result


def accuracy_at(points: Sequence[Point], budget: float) -> float | None:
    """The best accuracy among points spending at most `budget` (share of cloud-only bytes)."""
    within = [p.accuracy for p in points if p.bytes_vs_cloud_only <= budget + 1e-12]
    return max(within) if within else None


def bytes_to_reach(points: Sequence[Point], target: float) -> float | None:
    """The fewest bytes (share of cloud-only) among points with accuracy >= target."""
    reaching = [p.bytes_vs_cloud_only for p in points if p.accuracy >= target - 1e-12]
    return min(reaching) if reaching else None


def format_share(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


PointT = TypeVar("PointT", bound=Point)


def pareto(points: Sequence[PointT]) -> list[PointT]:
    """Points not beaten on both accuracy (higher) and bytes (lower), by increasing bytes."""
    front: list[PointT] = []
    for point in sorted(points, key=lambda p: (p.bytes_vs_cloud_only, -p.accuracy)):
        if not front or point.accuracy > front[-1].accuracy:
            front.append(point)
    return front
