"""What a request costs a tier in energy: inference (busy time times power, or per token) and transmission (per
byte on a link), after PerLLM's E_infer and E_tran; idle power is accounted over time, not per request.

Configured per tier; a `PowerReader` (NVML on NVIDIA GPUs, RAPL on Intel CPUs: recserve.engines.power) replaces the
configured busy power with the hardware's reading where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class PowerReader(Protocol):
    """The hardware's own power reading, in watts, or None when it has none to give now."""

    def watts(self) -> float | None: ...


@dataclass(frozen=True)
class EnergyModel:
    """A tier's energy figures. Zero everywhere: the tier accounts no energy."""

    busy_watts: float = 0.0  # power drawn above idle while the engine generates
    idle_watts: float = 0.0  # power drawn while idle; accounted over wall time by the tier's metrics
    joules_per_token: float = 0.0  # per generated token, on top of busy_watts (a per-token model when watts are 0)
    joules_per_byte: float = 0.0  # transmission: per byte this tier sends or receives on its link up

    def inference_joules(self, busy_seconds: float, tokens: int, measured_watts: float | None = None) -> float:
        watts = self.busy_watts if measured_watts is None else measured_watts
        return max(busy_seconds, 0.0) * watts + max(tokens, 0) * self.joules_per_token

    def transmission_joules(self, bytes_on_link: int) -> float:
        return max(bytes_on_link, 0) * self.joules_per_byte
