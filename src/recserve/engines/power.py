"""The hardware's own power readings (recserve.core.energy.PowerReader): NVML on NVIDIA GPUs, RAPL on x86 CPUs.

Each reader's `watts()` is the average power since its previous reading (since it was made, the first time), from
an energy counter where the hardware has one, so a tier that reads once per request gets the power over that
request, not a sample of one instant. Where the counter cannot be read now, `watts()` is None and the tier falls back
to its configured power.

- `NvmlPowerReader`: NVIDIA GPUs through nvidia-ml-py (`pynvml`, imported only here): the total energy counter
  (nvmlDeviceGetTotalEnergyConsumption, millijoules, Volta and later), else the instantaneous board power
  (nvmlDeviceGetPowerUsage); summed over the GPUs chosen (all by default).
- `RaplPowerReader`: the CPU packages' energy counters under /sys/class/powercap/intel-rapl:N/energy_uj (Intel, and
  AMD Zen through the same driver), wrapping at max_energy_range_uj. Since Linux 5.10 only root may read them.
- `detect_power_reader()`: NVML where a GPU answers, else RAPL where readable, else None.
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

POWERCAP = Path("/sys/class/powercap")
_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")  # top-level zones; intel-rapl:0:0 and the like are parts of them


class NvmlPowerReader:
    """Average power of NVIDIA GPUs between reads, through NVML. Build it with `create()`."""

    def __init__(self, nvml: Any, handles: Sequence[Any], clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml
        self._handles = list(handles)
        self._clock = clock
        self._last = (self._clock(), self._energy_mj())

    @classmethod
    def create(cls, indices: Sequence[int] | None = None, nvml: Any = None) -> NvmlPowerReader | None:
        """A reader of the GPUs `indices` (all when None), or None without nvidia-ml-py, a driver or a GPU."""
        try:
            if nvml is None:
                nvml = importlib.import_module("pynvml")
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            chosen = range(count) if indices is None else [i for i in indices if 0 <= i < count]
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in chosen]
            if not handles:
                return None
            reader = cls(nvml, handles)
            return reader if reader._power_w() is not None else None
        except Exception:  # ImportError, NVMLError (no driver, no GPU, not supported): no reading to give
            return None

    def _energy_mj(self) -> float | None:
        try:
            return float(sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles))
        except Exception:  # older GPUs have no energy counter
            return None

    def _power_w(self) -> float | None:
        try:
            return float(sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles)) / 1000.0
        except Exception:
            return None

    def watts(self) -> float | None:
        now, energy = self._clock(), self._energy_mj()
        then, before = self._last
        self._last = (now, energy)
        if energy is not None and before is not None and now > then and energy >= before:
            return (energy - before) / 1000.0 / (now - then)
        return self._power_w()


class RaplPowerReader:
    """Average power of the CPU packages between reads, from RAPL's energy counters. Build it with `create()`."""

    def __init__(self, zones: Sequence[Path], clock: Callable[[], float] = time.monotonic) -> None:
        self._zones = list(zones)
        self._clock = clock
        self._ranges = [_read_int(zone / "max_energy_range_uj") for zone in self._zones]
        self._last = (self._clock(), self._energies())

    @classmethod
    def create(cls, root: Path = POWERCAP, clock: Callable[[], float] = time.monotonic) -> RaplPowerReader | None:
        """A reader of every CPU package under `root`, or None where there is none or it cannot be read."""
        try:
            zones = sorted(p for p in root.iterdir() if _PACKAGE_ZONE.match(p.name) and (p / "energy_uj").is_file())
        except OSError:
            return None
        if not zones:
            return None
        reader = cls(zones, clock)
        return reader if reader._last[1] is not None else None

    def _energies(self) -> list[int] | None:
        values = [_read_int(zone / "energy_uj") for zone in self._zones]
        return None if any(v is None for v in values) else [v for v in values if v is not None]

    def watts(self) -> float | None:
        now, energies = self._clock(), self._energies()
        then, before = self._last
        self._last = (now, energies)
        if energies is None or before is None or now <= then:
            return None
        joules = 0.0
        for after, earlier, wrap in zip(energies, before, self._ranges, strict=True):
            delta = after - earlier
            if delta < 0:  # the counter wrapped
                if not wrap:
                    return None
                delta += wrap
            joules += delta / 1e6
        return joules / (now - then)


def detect_power_reader(root: Path = POWERCAP) -> NvmlPowerReader | RaplPowerReader | None:
    """What this machine's hardware reports: its GPUs through NVML, else its CPUs through RAPL, else None."""
    return NvmlPowerReader.create() or RaplPowerReader.create(root)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # absent, or root-only (PermissionError)
        return None
