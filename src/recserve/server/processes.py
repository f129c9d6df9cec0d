"""Tier processes on loopback: `recserve serve` children for the demo, live evaluation and tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from prometheus_client.parser import text_string_to_metric_families


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports. All sockets stay open until every port is known: closing each
    before asking for the next lets the kernel hand out the same port twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def _taken(port: int) -> bool:
    """Whether another process holds `port` on any address (a tier's metrics endpoint binds every address)."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def replay_tiers(names: Sequence[str], chain: Sequence[str], traces: Path) -> list[list[str]]:
    """`recserve serve` arguments of tiers that replay recorded answers from `traces`, one model of `chain` each."""
    return [
        ["--tier", name, "--engine", "replay", "--traces", str(traces), "--trace-model", model]
        for name, model in zip(names, chain, strict=True)
    ]


def _tier_name(tier_args: Sequence[str]) -> str:
    return tier_args[tier_args.index("--tier") + 1]


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until `url` answers 200 (a health endpoint), failing early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f}s")


class TierProcesses:
    """`recserve serve` child processes, last tier first, each started once its next tier is ready."""

    def __init__(
        self,
        tier_args: Sequence[list[str]],
        log_dir: Path,
        *,
        wiring: Callable[[int, list[int]], list[str]] | None = None,
    ) -> None:
        """`wiring`: the --next/--skip-to/--callers arguments of tier `index` given every tier's port; default, a
        chain (each tier forwards to the one after it)."""
        ports = free_ports(2 * len(tier_args))
        self.ports, self.metrics_ports = ports[: len(tier_args)], ports[len(tier_args) :]
        self.log_dir = log_dir
        self._tier_args = tier_args
        self._wiring = wiring
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: list[BinaryIO] = []

    def start(self, timeout: float = 120.0) -> None:
        try:
            for index in reversed(range(len(self._tier_args))):
                self.start_one(index, timeout)
        except BaseException:
            self.stop()  # no orphans, no open logs, when one tier fails to start
            raise

    def start_one(self, index: int, timeout: float = 120.0) -> None:
        """(Re)start tier `index` on its port and wait until it reports ready."""
        if index not in self._procs:
            # The ports were free when chosen, but the tiers started since (a vLLM engine binds ports of its own
            # at random) may hold one by now: take another. Tiers start last first, so no started tier names it.
            for ports in (self.ports, self.metrics_ports):
                if _taken(ports[index]):
                    ports[index] = free_port()
        args = [
            sys.executable, "-m", "recserve", "serve",
            "--host", "127.0.0.1",
            "--port", str(self.ports[index]),
            "--metrics-port", str(self.metrics_ports[index]),
            *self._tier_args[index],
        ]  # fmt: skip
        if "--tls-cert" not in args:
            args.append("--plaintext")  # loopback only: the tiers never leave this machine
        if self._wiring is not None:
            args += self._wiring(index, self.ports)
        else:
            if index + 1 < len(self._tier_args):
                args += ["--next", f"127.0.0.1:{self.ports[index + 1]}"]
            if index > 0 and "--callers" not in args:
                args += ["--callers", _tier_name(self._tier_args[index - 1])]
        log_path = self.log_dir / f"tier{index}.log"
        self._logs.append(log_path.open("ab"))
        start = log_path.stat().st_size
        self._procs[index] = subprocess.Popen(args, stdout=self._logs[-1], stderr=subprocess.STDOUT)
        self._wait_ready(index, log_path, start, timeout)

    def stop_one(self, index: int, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        proc = self._procs[index]
        if proc.poll() is None:
            proc.send_signal(signum)
        return self._wait(proc, timeout)

    @staticmethod
    def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
        # Signal once only: a second SIGTERM reaching a tier after its event loop closed would kill it.
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _wait_ready(self, index: int, log: Path, offset: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = self._procs[index]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"tier {index} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            if b" ready on port " in log.read_bytes()[offset:]:
                return
            time.sleep(0.1)
        raise TimeoutError(f"tier {index} not ready after {timeout:.0f}s:\n{log.read_text()[-2000:]}")

    def pid(self, index: int) -> int:
        return self._procs[index].pid

    def stop(self) -> list[int]:
        """SIGTERM every tier at once (graceful), then collect exit codes, first tier first."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [self._wait(self._procs[index], 30.0) for index in sorted(self._procs)]
        for log in self._logs:
            log.close()
        return codes

    def scrape_bytes(self, index: int) -> dict[tuple[str, str], float]:
        """recserve_transmitted_bytes_total of one tier, by (peer, direction), over HTTP."""
        url = f"http://127.0.0.1:{self.metrics_ports[index]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        found: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "recserve_transmitted_bytes_total":
                    found[(sample.labels["peer"], sample.labels["direction"])] = sample.value
        return found
