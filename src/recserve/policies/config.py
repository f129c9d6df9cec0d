"""Policy configurations: one frozen object per offload policy, where its defaults, checks and options live.

A configuration field is also an option of `recserve serve` (flag and RECSERVE_* variable) and, unless the replay
sets it itself, of `recserve eval`: its metadata says what it means, how it reads from and is written as text, and
what values it takes. A configuration builds its policy and writes itself back as `recserve serve` flags, so the
offline replay and the live tiers of an evaluation run one object.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, ClassVar, Self

from recserve.core.offload import OffloadPolicy

_METADATA_KEY = "recserve.option"


def share(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be within [0, 1]"


def at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


def positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def a_number(value: float) -> str | None:
    return "must be a number" if math.isnan(value) else None


@dataclass(frozen=True)
class PolicyOption:
    """One option of a policy, as its configuration field describes it."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any]  # from the text of a flag or variable
    text: Callable[[Any], str] | None  # how a value is written as a flag's argument; None: its repr
    check: Callable[[Any], str | None] | None  # what is wrong with a value (e.g. "must be at least 1"), or None
    in_eval: bool  # whether `recserve eval` takes it (not when the replay sets it from the chain or per tier)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def format(self, value: Any) -> str:
        return repr(value) if self.text is None else self.text(value)

    @classmethod
    def of(cls, config_field: Field[Any]) -> PolicyOption:
        return cls(config_field.name, config_field.default, **config_field.metadata[_METADATA_KEY])


def option(
    default: Any,
    help: str,
    *,
    check: Callable[[Any], str | None] | None = None,
    parse: Callable[[str], Any] | None = None,
    text: Callable[[Any], str] | None = None,
    in_eval: bool = True,
) -> Any:
    """A configuration field that is also a command-line option; `parse` defaults to the default's type."""
    metadata = {"help": help, "parse": parse or type(default), "text": text, "check": check, "in_eval": in_eval}
    return field(default=default, metadata={_METADATA_KEY: metadata})


def window_option() -> Any:
    return option(10_000, "confidences kept per task family", check=at_least_one)


def explore_option() -> Any:
    return option(0.05, "share of would-be-kept requests forwarded to measure the tiers above", check=share)


def probe_seed_option() -> Any:
    return option(0, "seed of the random probes and of the draws at the forwarding border and among tied confidences")


@dataclass(frozen=True, kw_only=True)
class OptionConfig(ABC):
    """A frozen configuration whose fields are `option`s: it checks them, and makes and reads their flags. The base of
    the offload policies' and the placements' configurations."""

    name: ClassVar[str]  # the value of its flag
    kind: ClassVar[str]  # "policy" or "placement": the flag is --KIND, and its complaints name it

    def __post_init__(self) -> None:
        problems = list(self.problems())
        if problems:
            raise ValueError(f"{self.name} {self.kind}: {'; '.join(problems)}")

    def problems(self) -> Iterator[str]:
        for spec in self.options():
            value = getattr(self, spec.name)
            complaint = spec.check(value) if spec.check else None
            if complaint:
                yield f"{spec.name} {complaint}, got {spec.format(value)}"

    def serve_flags(self) -> list[str]:
        """The `recserve serve` flags that make a tier build this configuration."""
        flags = [f"--{self.kind}", self.name]
        for spec in self.options():
            flags += [spec.flag, spec.format(getattr(self, spec.name))]
        return flags

    @classmethod
    def options(cls) -> tuple[PolicyOption, ...]:
        return tuple(PolicyOption.of(config_field) for config_field in fields(cls))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Self:
        """The configuration with the values of its options found in `values` (by option name) and the defaults
        of the others; values of options it does not have are ignored."""
        return cls(**{spec.name: values[spec.name] for spec in cls.options() if spec.name in values})


@dataclass(frozen=True, kw_only=True)
class PolicyConfig(OptionConfig):
    """The configuration of one offload policy; subclasses are frozen dataclasses of `option` fields."""

    kind: ClassVar[str] = "policy"
    aliases: ClassVar[tuple[str, ...]] = ()  # other names `--policy` accepts for it

    @property
    def learns_from_feedback(self) -> bool:
        """Whether an evaluation sends it each request's verdict."""
        return False

    @abstractmethod
    def build(self) -> OffloadPolicy:
        """A new policy object, with no state yet."""

    def for_chain(self, tiers: int) -> Self:
        """This configuration for a tier of a chain of `tiers` tiers."""
        return self


@dataclass(frozen=True, kw_only=True)
class SplitTargetConfig(PolicyConfig):
    """A policy that splits one target (a byte budget, an accuracy gap) over the links of its chain."""

    links: int = option(
        2, "links in the chain (tiers - 1), to split the target over", check=at_least_one, in_eval=False
    )

    def for_chain(self, tiers: int) -> Self:
        return replace(self, links=tiers - 1)
