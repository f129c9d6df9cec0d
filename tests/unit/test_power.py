"""Hardware power readers: RAPL from a fake sysfs folder, NVML through a fake module, and their absence."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from recserve.core.energy import PowerReader
from recserve.engines.power import NvmlPowerReader, RaplPowerReader, detect_power_reader


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def zone(root: Path, name: str, energy_uj: int, wrap: int = 1_000_000_000, label: str = "package-0") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "energy_uj").write_text(f"{energy_uj}\n")
    (folder / "max_energy_range_uj").write_text(f"{wrap}\n")
    (folder / "name").write_text(f"{label}\n")
    return folder


def test_rapl_reports_the_packages_average_power_between_reads(tmp_path: Path) -> None:
    clock = Clock()
    p0 = zone(tmp_path, "intel-rapl:0", 5_000_000, wrap=70_000_000)
    p1 = zone(tmp_path, "intel-rapl:1", 1_000_000, label="package-1")
    zone(tmp_path, "intel-rapl:0:0", 0, label="core")  # a part of package 0: not counted twice
    reader = RaplPowerReader.create(tmp_path, clock)
    assert reader is not None
    as_protocol: PowerReader = reader  # mypy checks that it is one
    clock.now += 2.0
    (p0 / "energy_uj").write_text("65000000")  # 60 J in 2 s
    (p1 / "energy_uj").write_text("21000000")  # 20 J
    assert as_protocol.watts() == pytest.approx(40.0)
    # Package 0's counter wraps at max_energy_range_uj, 70 J: 10 J more across the wrap in 1 s, package 1 idle.
    clock.now += 1.0
    (p0 / "energy_uj").write_text(str(65_000_000 + 10_000_000 - 70_000_000))
    assert reader.watts() == pytest.approx(10.0)


def test_rapl_is_none_when_absent_or_unreadable(tmp_path: Path) -> None:
    assert RaplPowerReader.create(tmp_path / "missing") is None
    assert RaplPowerReader.create(tmp_path) is None  # no zones
    folder = zone(tmp_path, "intel-rapl:0", 1)
    (folder / "energy_uj").write_text("not a number")  # as good as unreadable
    assert RaplPowerReader.create(tmp_path) is None
    (folder / "energy_uj").write_text("7")
    reader = RaplPowerReader.create(tmp_path)
    assert reader is not None
    (folder / "energy_uj").unlink()  # gone later: no reading, the tier uses its configured power
    assert reader.watts() is None


class FakeNvml:
    """Two GPUs: 100 000 mJ and 50 000 mJ so far, drawing 300 W and 100 W now."""

    class NVMLError(Exception):
        pass

    def __init__(self, energy: bool = True) -> None:
        self.energy = {0: 100_000, 1: 50_000}
        self.has_energy = energy

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 300_000 if handle == 0 else 100_000

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        if not self.has_energy:
            raise self.NVMLError("Not Supported")
        return self.energy[handle]


def test_nvml_reports_the_energy_counters_average_and_falls_back_to_power() -> None:
    nvml = FakeNvml()
    reader = NvmlPowerReader.create(nvml=nvml)
    assert reader is not None
    clock = Clock()
    reader._clock = clock
    reader._last = (clock.now, reader._energy_mj())
    clock.now += 0.5
    nvml.energy[0] += 200_000  # 200 J in 0.5 s on GPU 0, 50 J on GPU 1: 500 W together
    nvml.energy[1] += 50_000
    assert reader.watts() == pytest.approx(500.0)
    only_second = NvmlPowerReader.create([1], nvml=FakeNvml(energy=False))
    assert only_second is not None
    assert only_second.watts() == pytest.approx(100.0)  # no counter: the instantaneous power


def test_nvml_absent_gives_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert NvmlPowerReader.create() is None

    class NoDriver(FakeNvml):
        def nvmlInit(self) -> None:
            raise self.NVMLError("Driver Not Loaded")

    assert NvmlPowerReader.create(nvml=NoDriver()) is None
    assert NvmlPowerReader.create([5], nvml=FakeNvml()) is None  # no such GPU
    assert detect_power_reader(tmp_path) is None
    zone(tmp_path, "intel-rapl:0", 1)
    assert isinstance(detect_power_reader(tmp_path), RaplPowerReader)
