"""Reading a frontier: points of accuracy against bytes (a share of cloud-only), their Pareto front, and look-ups."""

from __future__ import annotations

Point = dict[str, float]


def accuracy_at(points: list[Point], budget: float) -> float | None:
    """The best accuracy among points spending at most `budget` (share of cloud-only bytes)."""
    within = [p["accuracy"] for p in points if p["bytes_vs_cloud_only"] <= budget + 1e-12]
    return max(within) if within else None


def bytes_to_reach(points: list[Point], target: float) -> float | None:
    """The fewest bytes (share of cloud-only) among points with accuracy >= target."""
    reaching = [p["bytes_vs_cloud_only"] for p in points if p["accuracy"] >= target - 1e-12]
    return min(reaching) if reaching else None


def format_share(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def pareto(points: list[Point]) -> list[Point]:
    """Points not beaten on both accuracy (higher) and bytes (lower), by increasing bytes."""
    front: list[Point] = []
    for point in sorted(points, key=lambda p: (p["bytes_vs_cloud_only"], -p["accuracy"])):
        if not front or point["accuracy"] > front[-1]["accuracy"]:
            front.append(point)
    return front
