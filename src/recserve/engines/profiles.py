"""Server profiles: how fast and at what power a kind of server generates, for the emulated engine and simulators.

A profile gives a server's prefill rate, its decode rate for one sequence alone, how many sequences it runs at once
(`batch_limit`, continuous batching) and how a decode step slows as the batch grows:

    step_seconds(b) = (1 / decode_tokens_per_s) * (1 + batch_slowdown * (b - 1))

Decoding is bound by reading the weights at small batches, so a step of b sequences costs little more than a step of
one: alpha is small on a GPU (measured below at 0.005-0.008) and larger where the arithmetic, not the memory, binds.
Power is the whole server's draw: `busy_watts` generating one sequence, rising linearly to `busy_watts_at_limit` at
`batch_limit` sequences, and `idle_watts` doing nothing. Link defaults (the server's uplink to the next tier) give
transmission time and energy.

Where each number comes from is said beside it. The cloud and edge GPU figures are our own measurements
(bench/gpu_profile.py, results in docs/results/gpu_profile.json: an NVIDIA H200 with random weights, plain PyTorch
with CUDA-graph decode steps, no vLLM, so vLLM would be somewhat faster); the phone and the edge box take published
figures. docs/placement.md ("Emulated servers and profiles") has the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from recserve.core.energy import EnergyModel


@dataclass(frozen=True)
class ServerProfile:
    """A kind of server's speed, capacity and power (see the module docstring)."""

    name: str
    prefill_tokens_per_s: float  # prompt tokens per second, one prompt alone
    decode_tokens_per_s: float  # generated tokens per second of one sequence decoding alone (batch 1)
    batch_limit: int  # sequences decoded at once; more requests wait in a queue (FIFO)
    batch_slowdown: float  # alpha: a step of b sequences takes (1 + alpha * (b - 1)) times a step of one
    busy_watts: float  # the server's whole draw while generating one sequence
    idle_watts: float  # its draw while doing nothing
    busy_watts_at_limit: float = 0.0  # its draw with batch_limit sequences; 0: the same as busy_watts
    uplink_bytes_per_s: float = 0.0  # its link to the next tier; 0: not modelled
    joules_per_byte: float = 0.0  # transmission energy on that link, per byte sent or received
    model: str = ""  # the model the figures are for
    source: str = ""  # where the figures come from, in a line

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0 or self.decode_tokens_per_s <= 0:
            raise ValueError(f"profile {self.name}: prefill and decode rates must be positive")
        if self.batch_limit < 1 or self.batch_slowdown < 0:
            raise ValueError(f"profile {self.name}: batch_limit must be 1 or more and batch_slowdown 0 or more")

    def prefill_seconds(self, prompt_tokens: int) -> float:
        return max(prompt_tokens, 0) / self.prefill_tokens_per_s

    def step_seconds(self, batch: int) -> float:
        """The time of one decode step while `batch` sequences decode at once (each gets one token)."""
        return (1.0 + self.batch_slowdown * (max(batch, 1) - 1)) / self.decode_tokens_per_s

    def watts(self, batch: int) -> float:
        """The server's draw while `batch` sequences run (linear between batch 1 and batch_limit); idle at 0."""
        if batch <= 0:
            return self.idle_watts
        top = self.busy_watts_at_limit or self.busy_watts
        if self.batch_limit == 1:
            return self.busy_watts
        return self.busy_watts + (top - self.busy_watts) * (min(batch, self.batch_limit) - 1) / (self.batch_limit - 1)

    def transmission_seconds(self, nbytes: int) -> float:
        return max(nbytes, 0) / self.uplink_bytes_per_s if self.uplink_bytes_per_s > 0 else 0.0

    def energy_model(self) -> EnergyModel:
        """The tier's EnergyModel: power above idle while busy (at batch 1), idle power, the link's joules per byte."""
        return EnergyModel(
            busy_watts=max(self.busy_watts - self.idle_watts, 0.0),
            idle_watts=self.idle_watts,
            joules_per_byte=self.joules_per_byte,
        )


# Links. Phone: an LTE uplink's power grows by about 438 mW per Mbit/s sent (Huang et al., "A Close Examination of
# Performance and Power Characteristics of 4G LTE Networks", MobiSys 2012): 0.44 uJ a bit, 3.5 uJ a byte; 10 Mbit/s
# is a typical LTE/5G uplink. Edge site to cloud: the internet's energy intensity, 0.06 kWh/GB in 2015 and halving
# about every two years (Aslan et al., Journal of Industrial Ecology, 2018), about 0.005 kWh/GB by 2022: 2e-8 J a
# byte, over a 1 Gbit/s uplink.
PHONE_UPLINK_BYTES_PER_S = 10e6 / 8
PHONE_JOULES_PER_BYTE = 3.5e-6
EDGE_UPLINK_BYTES_PER_S = 1e9 / 8
EDGE_JOULES_PER_BYTE = 2e-8

PROFILES: dict[str, ServerProfile] = {
    # Published: Meta's "Introducing quantized Llama models with increased speed and a reduced memory footprint"
    # (Oct 2024): Llama 3.2 1B, SpinQuant 4-bit weights, ExecuTorch on the CPU of a OnePlus 12 (Snapdragon 8 Gen 3):
    # about 260 prompt tokens/s and 50 generated tokens/s. One user: batch 1. Power: a phone's SoC under sustained
    # LLM load draws a few watts and throttles (Laskaridis et al., "MELTing point: Mobile Evaluation of Language
    # Transformers", MobiCom 2024); 5 W busy and 0.5 W idle (screen off) are our round assumptions.
    "phone": ServerProfile(
        name="phone",
        prefill_tokens_per_s=260.0,
        decode_tokens_per_s=50.0,
        batch_limit=1,
        batch_slowdown=0.0,
        busy_watts=5.0,
        idle_watts=0.5,
        uplink_bytes_per_s=PHONE_UPLINK_BYTES_PER_S,
        joules_per_byte=PHONE_JOULES_PER_BYTE,
        model="Llama-3.2-1B, 4-bit",
        source="published: Meta, quantized Llama 3.2 on a OnePlus 12 (Oct 2024); power assumed",
    ),
    # Published: NVIDIA's TensorRT Edge-LLM performance benchmarks (0.4.0), Jetson AGX Thor: Llama-3.1-8B-Instruct,
    # INT4 AWQ, batch 1: 1777 prompt tokens/s, 50.8 generated tokens/s; batch 8: 135.3 tokens/s in all, so a step of
    # 8 takes 3.0 times a step of one: alpha = (3.0 - 1) / 7 = 0.29 (4-bit weights make the step arithmetic-bound
    # sooner than on a data-centre GPU). Power: Thor's module is rated 40-130 W; 60 W busy, 80 W at batch 8 and
    # 15 W idle are our assumptions within that range (no power was published with these rates).
    # Measured here for comparison (bench/cpu_profile.py, docs/results/cpu_profile.json): llama.cpp on 2 cores of
    # this CPU only runs the generated tiny models (0.1-3M parameters); they say nothing of a real edge box.
    "edge-box": ServerProfile(
        name="edge-box",
        prefill_tokens_per_s=1777.0,
        decode_tokens_per_s=50.8,
        batch_limit=8,
        batch_slowdown=0.29,
        busy_watts=60.0,
        busy_watts_at_limit=80.0,
        idle_watts=15.0,
        uplink_bytes_per_s=EDGE_UPLINK_BYTES_PER_S,
        joules_per_byte=EDGE_JOULES_PER_BYTE,
        model="Llama-3.1-8B, INT4 AWQ",
        source="published: NVIDIA TensorRT Edge-LLM benchmarks, Jetson AGX Thor; power assumed",
    ),
    # Measured with bench/gpu_profile.py on an NVIDIA H200, random bf16 weights, Llama-3.1-8B's shape, plain PyTorch
    # with CUDA-graph decode steps (no vLLM: vLLM would be faster): prefill 16585 tokens/s (one 512-token prompt);
    # decode 6.98 ms a step at batch 1 (143 tokens/s), 7.65 at 8, 8.82 at 32, 10.2 at 64: alpha 0.0076 (least
    # squares). Power by NVML's energy counter: 405 W decoding one sequence, 578 W decoding 64. Idle: 81.5 W by
    # nvidia-smi with no process on the GPU (127 W with a CUDA context held and nothing running). An edge site with a
    # data-centre GPU; 64 sequences at once as measured (the KV cache has room for far more).
    "edge-gpu": ServerProfile(
        name="edge-gpu",
        prefill_tokens_per_s=16585.0,
        decode_tokens_per_s=143.4,
        batch_limit=64,
        batch_slowdown=0.0076,
        busy_watts=405.0,
        busy_watts_at_limit=578.0,
        idle_watts=81.5,
        uplink_bytes_per_s=EDGE_UPLINK_BYTES_PER_S,
        joules_per_byte=EDGE_JOULES_PER_BYTE,
        model="Llama-3.1-8B, bf16",
        source="measured: bench/gpu_profile.py, NVIDIA H200, random weights, PyTorch without vLLM",
    ),
    # Measured likewise, Llama-3.1-70B's shape (131 GiB of bf16 weights on one GPU, so only 8 sequences' KV cache fit
    # beside them): prefill 3706 tokens/s (one 512-token prompt); decode 42.7 ms a step at batch 1 (23.4 tokens/s),
    # 44.1 at 8: alpha 0.0048. Power: 547 W at batch 1, 559 W at 8; idle as above.
    "cloud-gpu": ServerProfile(
        name="cloud-gpu",
        prefill_tokens_per_s=3706.0,
        decode_tokens_per_s=23.4,
        batch_limit=8,
        batch_slowdown=0.0048,
        busy_watts=547.0,
        busy_watts_at_limit=559.0,
        idle_watts=81.5,
        model="Llama-3.1-70B, bf16",
        source="measured: bench/gpu_profile.py, NVIDIA H200, random weights, PyTorch without vLLM",
    ),
    # Measured likewise, Qwen2.5-32B's shape: prefill 7358 tokens/s; decode 22.2 ms a step at batch 1 (45.1
    # tokens/s), 23.8 at 8, 25.8 at 32, 29.3 at 64: alpha 0.0052. Power: 494 W at batch 1, 658 W at 64.
    "cloud-gpu-32b": ServerProfile(
        name="cloud-gpu-32b",
        prefill_tokens_per_s=7358.0,
        decode_tokens_per_s=45.1,
        batch_limit=64,
        batch_slowdown=0.0052,
        busy_watts=494.0,
        busy_watts_at_limit=658.0,
        idle_watts=81.5,
        model="Qwen2.5-32B shape, bf16",
        source="measured: bench/gpu_profile.py, NVIDIA H200, random weights, PyTorch without vLLM",
    ),
}


def get_profile(name: str) -> ServerProfile:
    """The named profile; ValueError naming the choices."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown server profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
