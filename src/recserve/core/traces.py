"""Recorded multi-model traces: load any folder in the trace schema, and derive compact subsets of one.

A trace folder holds `queries.jsonl.gz` (one query per line) and `per_model_long.csv.gz` (one row
per query and model); the schema is documented in docs/traces.md.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

QUERIES_FILE = "queries.jsonl.gz"
ANSWERS_FILE = "per_model_long.csv.gz"
# Multiple-choice benchmarks record the answer letter's log-prob; the rest a self-assessed p("Y").
CHOICE_SIGNAL = "ModelIntrinsicLogProb"
# The compact trace bundled with the package (origin in its README) and its models, cheapest first: the demo,
# load runs, benchmarks and tests replay it.
BUNDLED_TRACE = Path(__file__).resolve().parent.parent / "data" / "traces" / "zellinger-demo"
BUNDLED_CHAIN = ("llama3.2-1b", "llama3.1-8b", "llama3.1-70b")

QueryKey = tuple[str, str, int]  # benchmark, split, qid


@dataclass(frozen=True)
class TraceQuery:
    benchmark: str
    split: str
    qid: int
    system_prompt: str
    user_prompt: str
    gold: str

    @property
    def key(self) -> QueryKey:
        return (self.benchmark, self.split, self.qid)


@dataclass(frozen=True)
class TraceAnswer:
    model: str
    answer: str
    correct: bool
    conf_signal: str
    logprob: float  # natural log of the recorded confidence probability; may be -inf
    tokens_in: int
    tokens_out: int

    @property
    def is_choice(self) -> bool:
        return self.conf_signal == CHOICE_SIGNAL


@dataclass(frozen=True)
class TraceSet:
    """Queries in file order and, per query, the answers of each loaded model."""

    queries: tuple[TraceQuery, ...]
    models: tuple[str, ...]
    answers: dict[QueryKey, dict[str, TraceAnswer]]

    @classmethod
    def load(cls, folder: str | Path, models: Iterable[str] | None = None) -> TraceSet:
        """Load a trace folder, keeping only `models` (all when None); fail with a clear message."""
        folder = Path(folder)
        for name in (QUERIES_FILE, ANSWERS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a trace folder: {name} is missing")
        wanted = set(models) if models is not None else None
        answers: dict[QueryKey, dict[str, TraceAnswer]] = {}
        seen_models: dict[str, None] = {}
        for row in _read_csv(folder / ANSWERS_FILE):
            model = row["model"]
            seen_models.setdefault(model)
            if wanted is not None and model not in wanted:
                continue
            key = (row["benchmark"], row["split"], int(row["qid"]))
            answers.setdefault(key, {})[model] = TraceAnswer(
                model=model,
                answer=row["answer"],
                correct=row["correct"].strip().lower() == "true",
                conf_signal=row["conf_signal"],
                logprob=_parse_logprob(row["raw_conf_logprob"]),
                tokens_in=_parse_int(row.get("tokens_in", "")),
                tokens_out=_parse_int(row.get("tokens_out", "")),
            )
        if wanted is not None and (missing := wanted - set(seen_models)):
            raise ValueError(
                f"model(s) {', '.join(sorted(missing))} not in trace folder {folder}; it has: {', '.join(seen_models)}"
            )
        queries = tuple(q for q in _read_queries(folder / QUERIES_FILE) if q.key in answers)
        return cls(queries, tuple(m for m in seen_models if wanted is None or m in wanted), answers)

    def benchmarks(self) -> list[str]:
        return sorted({q.benchmark for q in self.queries})


def _read_csv(path: Path) -> Iterator[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle)


def _read_queries(path: Path) -> Iterator[TraceQuery]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            yield TraceQuery(
                benchmark=record["benchmark"],
                split=record["split"],
                qid=int(record["qid"]),
                system_prompt=record.get("system_prompt") or "",
                user_prompt=record["user_prompt"],
                gold="" if record.get("gold") is None else str(record["gold"]),
            )


def _parse_logprob(text: str) -> float:
    text = text.strip()
    if not text:
        return -math.inf
    value = float(text)
    return value if not math.isnan(value) else -math.inf


def _parse_int(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        return 0


def write_subset(
    source: str | Path,
    destination: str | Path,
    models: Iterable[str],
    splits: dict[str, str] | None = None,
    resplit: Callable[[str, str, int], str | None] | None = None,
) -> int:
    """Copy the rows of `models` (and, per benchmark, only `splits[benchmark]` when given) into a new
    trace folder in the same schema; values are copied unchanged but for the split, which `resplit`
    (benchmark, split, qid → the new split, or None to drop the query) assigns afresh when given.
    Returns the number of queries kept."""
    source, destination = Path(source), Path(destination)
    wanted = set(models)
    destination.mkdir(parents=True, exist_ok=True)

    def split_of(record: dict[str, str]) -> str | None:
        benchmark, split = record["benchmark"], record["split"]
        if splits is not None and splits.get(benchmark, split) != split:
            return None
        return resplit(benchmark, split, int(record["qid"])) if resplit is not None else split

    kept = 0
    with (
        gzip.open(source / QUERIES_FILE, "rt", encoding="utf-8") as src,
        _reproducible_gzip(destination / QUERIES_FILE) as dst,
    ):
        for line in src:
            record = json.loads(line)
            if split := split_of(record):
                dst.write(json.dumps({**record, "split": split}, ensure_ascii=False) + "\n")
                kept += 1
    with (
        gzip.open(source / ANSWERS_FILE, "rt", encoding="utf-8", newline="") as src,
        _reproducible_gzip(destination / ANSWERS_FILE) as dst,
    ):
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=list(reader.fieldnames or []))
        writer.writeheader()
        for row in reader:
            if row["model"] in wanted and (split := split_of(row)):
                writer.writerow({**row, "split": split})
    return kept


def _reproducible_gzip(path: Path) -> io.TextIOWrapper:
    # mtime=0 keeps the bytes reproducible, so regenerating a bundled trace leaves git clean.
    return io.TextIOWrapper(gzip.GzipFile(path, "wb", mtime=0), encoding="utf-8", newline="")
