"""A run's outcomes tallied per benchmark (accuracy, share per tier, bytes per link), and the table that prints them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from recserve.client.trace_client import Outcome


@dataclass(frozen=True)
class Summary:
    """The figures of one benchmark, or of all, in a run."""

    n: int
    accuracy: float  # share right among the judged outcomes; 0 when none was judged
    share_by_tier: list[float]
    bytes_by_link: list[int]
    bytes_total: int
    bytes_vs_cloud_only: float
    judged: int  # outcomes with a verdict

    def as_json(self) -> dict[str, object]:
        """Exactly the fields `recserve eval --json` documents."""
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "share_by_tier": self.share_by_tier,
            "bytes_total": self.bytes_total,
            "bytes_vs_cloud_only": self.bytes_vs_cloud_only,
        }


def summarise(outcomes: Sequence[Outcome], tiers: int, cloud_only_bytes: int) -> Summary:
    n = len(outcomes)
    judged = sum(o.correct is not None for o in outcomes)
    by_link = [sum(o.link_bytes[i] for o in outcomes) for i in range(tiers - 1)]
    total = sum(by_link)
    return Summary(
        n=n,
        accuracy=sum(o.correct is True for o in outcomes) / judged if judged else 0.0,
        share_by_tier=[sum(o.depth == d for o in outcomes) / n if n else 0.0 for d in range(tiers)],
        bytes_by_link=by_link,
        bytes_total=total,
        bytes_vs_cloud_only=total / cloud_only_bytes if cloud_only_bytes else 0.0,
        judged=judged,
    )


def summaries(outcomes: Sequence[Outcome], tiers: int, cloud_only: Mapping[str, int]) -> dict[str, Summary]:
    """Per benchmark (sorted) and `overall`; `cloud_only`: each benchmark's bytes when the last tier answers all."""
    result: dict[str, Summary] = {}
    for benchmark in sorted({o.benchmark for o in outcomes}):
        chosen = [o for o in outcomes if o.benchmark == benchmark]
        result[benchmark] = summarise(chosen, tiers, cloud_only[benchmark])
    result["overall"] = summarise(outcomes, tiers, sum(cloud_only.values()))
    return result


def bytes_by_benchmark(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """All link bytes of `outcomes`, per benchmark: of a cloud-only run, the reference of `summaries`."""
    totals: dict[str, int] = {}
    for outcome in outcomes:
        totals[outcome.benchmark] = totals.get(outcome.benchmark, 0) + sum(outcome.link_bytes)
    return totals


@dataclass(frozen=True)
class Column:
    """One column of a summary table: its header, and its text for a row (the row's name and summary)."""

    header: str
    cell: Callable[[str, Summary], str]


def format_table(results: Mapping[str, Summary], columns: Sequence[Column]) -> str:
    """One row per entry of `results`, columns right-aligned under their headers and a rule."""
    rows = [[c.header for c in columns], *([c.cell(name, s) for c in columns] for name, s in results.items())]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def accuracy_text(summary: Summary) -> str:
    return f"{summary.accuracy:.3f}" if summary.judged else "n/a"


BENCHMARK = Column("benchmark", lambda name, _: name)
COUNT = Column("n", lambda _, s: str(s.n))
ACCURACY = Column("accuracy", lambda _, s: accuracy_text(s))


def tier_columns(names: Sequence[str]) -> list[Column]:
    """The share each tier answered, then the bytes on each link, lowest first."""

    def share(depth: int) -> Column:
        return Column(f"{names[depth]} share", lambda _, s: f"{s.share_by_tier[depth]:.3f}")

    def link(index: int) -> Column:
        return Column(f"{names[index]}->{names[index + 1]} bytes", lambda _, s: str(s.bytes_by_link[index]))

    return [*(share(d) for d in range(len(names))), *(link(i) for i in range(len(names) - 1))]


def summary_columns(names: Sequence[str]) -> list[Column]:
    """Every figure of a summary: `recserve eval`'s table."""
    return [
        BENCHMARK,
        COUNT,
        ACCURACY,
        *tier_columns(names),
        Column("bytes total", lambda _, s: str(s.bytes_total)),
        Column("vs cloud-only", lambda _, s: f"{s.bytes_vs_cloud_only:.3f}"),
    ]
