"""A cloud GPU's serving profile: prefill and decode rates by batch, and its power, for the emulated cloud tier.

Builds Llama-shaped decoders with random bf16 weights at real sizes (Llama-3.1-8B; a 32B class model, Qwen2.5-32B's
shape) directly on the GPU, in plain PyTorch: fused QKV and gate/up projections, RMSNorm, rotary positions,
grouped-query attention over a preallocated KV cache. Decode steps are captured as a CUDA graph that feeds its own
greedy token back, so the rate is the GPU's and not Python's (transformers' eager `generate` is Python-bound at
small batches). No vLLM: paged attention and its kernels would do somewhat better, so read these as a floor.

Measured per model:
- prefill tokens/s of one 512-token prompt and of 8 prompts of 512 at once;
- decode tokens/s and the time of one step at batch 1, 8, 32 and 64 (context 512 tokens + the generated ones),
  and the slowdown alpha fitted to step(b) = step(1) * (1 + alpha * (b - 1)), the form of
  recserve.engines.profiles;
- the GPU's power in each phase (NVML's nvmlDeviceGetPowerUsage sampled every 20 ms in a thread, and
  nvmlDeviceGetTotalEnergyConsumption before and after), and idle power before any work.

Each phase repeats for at least --seconds so that the power reading settles. Writes JSON (--out). On a machine
without CUDA it runs a tiny model on the CPU, with no graphs and no power, to check the code.

    python bench/gpu_profile.py --out gpu_profile.json
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden


SHAPES = {
    # Llama-3.1-8B's config.json.
    "llama-3.1-8b": Shape("llama-3.1-8b", 32, 4096, 14336, 32, 8, 128256),
    # Qwen2.5-32B's shape (64 layers, 5120 wide, 27648 MLP, 40 query and 8 KV heads, 152064 vocabulary).
    "qwen2.5-32b-shape": Shape("qwen2.5-32b-shape", 64, 5120, 27648, 40, 8, 152064, 1000000.0),
    # Llama-3.1-70B's config.json: 131 GiB of bf16 weights, so only small batches fit beside them on 139 GiB.
    "llama-3.1-70b": Shape("llama-3.1-70b", 80, 8192, 28672, 64, 8, 128256),
    # For a CPU check of the code.
    "tiny": Shape("tiny", 2, 256, 512, 8, 2, 1000),
}


# The largest decode batch whose KV cache (768 tokens a sequence) fits beside the weights on one 141 GB GPU.
MAX_BATCH = {"llama-3.1-70b": 8}


class Model:
    """A Llama decoder with random weights and a static KV cache for `batch` sequences of up to `max_len` tokens."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
        self.s, self.device, self.dtype = shape, device, dtype
        d, hd = shape.hidden, shape.head_dim
        qkv = (shape.heads + 2 * shape.kv_heads) * hd

        def w(*size: int) -> torch.Tensor:
            return torch.empty(*size, device=device, dtype=dtype).normal_(0.0, 0.02)

        self.embed = w(shape.vocab, d)
        self.layers = [
            {
                "in_norm": torch.ones(d, device=device, dtype=dtype),
                "qkv": w(qkv, d),
                "o": w(d, shape.heads * hd),
                "post_norm": torch.ones(d, device=device, dtype=dtype),
                "gate_up": w(2 * shape.intermediate, d),
                "down": w(d, shape.intermediate),
            }
            for _ in range(shape.layers)
        ]
        self.norm = torch.ones(d, device=device, dtype=dtype)
        self.lm_head = w(shape.vocab, d)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    def allocate(self, batch: int, max_len: int) -> None:
        self.k_cache = self.v_cache = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        s = self.s
        size = (batch, s.kv_heads, max_len, s.head_dim)
        self.k_cache = [torch.zeros(size, device=self.device, dtype=self.dtype) for _ in range(s.layers)]
        self.v_cache = [torch.zeros(size, device=self.device, dtype=self.dtype) for _ in range(s.layers)]
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=self.device).float() / s.head_dim))
        freqs = torch.outer(torch.arange(max_len, device=self.device).float(), inv)
        self.cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(self.dtype)
        self.sin = torch.cat([freqs.sin(), freqs.sin()], -1).to(self.dtype)
        self.max_len = max_len

    @staticmethod
    def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * weight

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def _layer_qkv(self, layer: dict[str, torch.Tensor], h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
        s = self.s
        b, t, _ = h.shape
        qkv = self._rms(h, layer["in_norm"]) @ layer["qkv"].T
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        q = self._rope(q.view(b, t, s.heads, s.head_dim).transpose(1, 2), cos, sin)
        k = self._rope(k.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        return q, k, v

    def _layer_out(self, layer: dict[str, torch.Tensor], h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = h + attn @ layer["o"].T
        gate, up = (self._rms(h, layer["post_norm"]) @ layer["gate_up"].T).chunk(2, -1)
        return h + (F.silu(gate) * up) @ layer["down"].T

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the prompts (batch, t) and fill the cache from position 0; return each prompt's next token."""
        s = self.s
        b, t = tokens.shape
        h = self.embed[tokens]
        cos, sin = self.cos[:t], self.sin[:t]
        group = s.heads // s.kv_heads
        for i, layer in enumerate(self.layers):
            q, k, v = self._layer_qkv(layer, h, cos, sin)
            self.k_cache[i][:b, :, :t] = k
            self.v_cache[i][:b, :, :t] = v
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = self._layer_out(layer, h, attn.transpose(1, 2).reshape(b, t, s.heads * s.head_dim))
        logits = self._rms(h[:, -1], self.norm) @ self.lm_head.T
        return logits.argmax(-1)

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> None:
        """One step for every sequence: `tokens` (batch,) at position `pos` (a 1-element tensor), in place: the
        next greedy tokens replace `tokens` and `pos` advances, so a captured graph replays step after step."""
        s = self.s
        b = tokens.shape[0]
        h = self.embed[tokens].unsqueeze(1)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        group = s.heads // s.kv_heads
        mask = (torch.arange(self.max_len, device=self.device) <= pos).view(1, 1, 1, self.max_len)
        for i, layer in enumerate(self.layers):
            q, k, v = self._layer_qkv(layer, h, cos, sin)
            self.k_cache[i].index_copy_(2, pos, k)
            self.v_cache[i].index_copy_(2, pos, v)
            # One query per sequence: the query heads that share a KV head become that head's query rows (exact).
            qg = q.view(b, s.kv_heads, group, s.head_dim)
            attn = F.scaled_dot_product_attention(qg, self.k_cache[i], self.v_cache[i], attn_mask=mask)
            h = self._layer_out(layer, h, attn.reshape(b, 1, s.heads * s.head_dim))
        logits = self._rms(h[:, -1], self.norm) @ self.lm_head.T
        tokens.copy_(logits.argmax(-1))
        pos.add_(1)


class PowerSampler:
    """GPU power during a phase: NVML samples every 20 ms, and the energy counter before and after."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nvml, self.handle = nvml, handle
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy0 = 0
        self._t0 = 0.0

    def __enter__(self) -> PowerSampler:
        if self.nvml is not None:
            self._energy0 = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0)
            self._stop.wait(0.02)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.result: dict[str, float | None] = {"mean_watts": None, "max_watts": None, "energy_watts": None}
        if self.nvml is None:
            return
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        joules = (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._energy0) / 1000.0
        self.result = {
            "mean_watts": round(sum(self.samples) / max(len(self.samples), 1), 1),
            "max_watts": round(max(self.samples, default=0.0), 1),
            # The energy counter over the phase's wall time: the steadier of the two figures.
            "energy_watts": round(joules / self.seconds, 1),
        }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def repeat_for(seconds: float, device: torch.device, fn: Any, min_reps: int = 3) -> tuple[int, float]:
    """Call fn until `seconds` have passed (at least min_reps times); return (calls, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    reps = 0
    while reps < min_reps or time.perf_counter() - t0 < seconds:
        fn()
        reps += 1
        if reps % 8 == 0 or reps <= min_reps:
            sync(device)
    sync(device)
    return reps, time.perf_counter() - t0


def decode_rate(
    model: Model, batch: int, prompt: int, gen: int, seconds: float, nvml: Any, handle: Any, rng: torch.Generator
) -> dict[str, Any]:
    """Decode `gen` tokens after `prompt` for `batch` sequences, again and again for `seconds`: the step's time."""
    device = model.device
    model.allocate(batch, prompt + gen)
    tokens = torch.randint(0, model.s.vocab, (batch, prompt), device=device, generator=rng)
    with torch.inference_mode():
        step_tokens = model.prefill(tokens).clone()
        pos = torch.tensor([prompt], device=device)
        start = step_tokens.clone()
        step: Any = lambda: model.decode(step_tokens, pos)  # noqa: E731
        if device.type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    model.decode(step_tokens, pos)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model.decode(step_tokens, pos)
            step = graph.replay

        def run_generation() -> None:
            # Positions prompt .. prompt + gen - 1: the context grows as in a real generation.
            pos.fill_(prompt)
            step_tokens.copy_(start)
            for _ in range(gen):
                step()

        run_generation()  # warm-up
        with PowerSampler(nvml, handle) as power:
            reps, secs = repeat_for(seconds, device, run_generation, min_reps=1)
    step_s = secs / (reps * gen)
    row: dict[str, Any] = {"batch": batch, "context": f"{prompt}..{prompt + gen}", "step_ms": round(step_s * 1000, 3)}
    row["tokens_per_s"] = round(batch / step_s, 1)
    row["tokens_per_s_per_sequence"] = round(1 / step_s, 1)
    row.update(power.result)
    watts = power.result["energy_watts"]
    row["joules_per_token"] = None if watts is None else round(watts * step_s / batch, 4)
    return row


def profile_model(
    shape: Shape, device: torch.device, nvml: Any, handle: Any, batches: list[int], seconds: float
) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompt, gen = 512, 256
    t0 = time.perf_counter()
    model = Model(shape, device, dtype)
    sync(device)
    out: dict[str, Any] = {
        "shape": asdict(shape),
        "params_billion": round(shape.params / 1e9, 2),
        "weights_gib": round(shape.params * torch.finfo(dtype).bits / 8 / 2**30, 1),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "prefill": [],
        "decode": [],
    }
    gen_ = torch.Generator(device=device).manual_seed(0)
    for batch in (1, 8):
        model.allocate(batch, prompt + gen)
        tokens = torch.randint(0, shape.vocab, (batch, prompt), device=device, generator=gen_)
        with torch.inference_mode():
            model.prefill(tokens)  # warm-up
            with PowerSampler(nvml, handle) as power:
                reps, secs = repeat_for(seconds, device, lambda: model.prefill(tokens))  # noqa: B023
        row = {"batch": batch, "prompt_tokens": prompt, "seconds_per_prefill": secs / reps}
        row["tokens_per_s"] = round(batch * prompt * reps / secs, 1)
        row.update(power.result)
        out["prefill"].append(row)
        print(f"{shape.name} prefill batch {batch}x{prompt}: {row['tokens_per_s']:.0f} tok/s {power.result}")
    for batch in batches:
        row = decode_rate(model, batch, prompt, gen, seconds, nvml, handle, gen_)
        out["decode"].append(row)
        rate, watts = row["tokens_per_s"], row["energy_watts"]
        print(f"{shape.name} decode batch {batch}: {row['step_ms']} ms/step, {rate:.0f} tok/s, {watts} W")
    # Least squares for step(b) / step(1) - 1 = alpha * (b - 1).
    base = out["decode"][0]["step_ms"]
    pairs = [(r["batch"] - 1, r["step_ms"] / base - 1) for r in out["decode"][1:]]
    den = sum(x * x for x, _ in pairs)
    out["batch_slowdown_alpha"] = round(sum(x * y for x, y in pairs) / den, 4) if den else 0.0
    model.layers.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_profile.json")
    parser.add_argument("--models", default="llama-3.1-8b,qwen2.5-32b-shape,llama-3.1-70b")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=4.0, help="each phase repeats for at least this long")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    models = args.models.split(",") if cuda else ["tiny"]
    nvml: Any = None
    handle: Any = None
    result: dict[str, Any] = {
        "method": "bench/gpu_profile.py: random bf16 weights, plain PyTorch with CUDA-graph decode steps, no vLLM",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if cuda:
        import pynvml

        pynvml.nvmlInit()
        nvml, handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        result["device"] = name.decode() if isinstance(name, bytes) else name
        result["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
        result["power_limit_watts"] = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0
        torch.ones(1, device=device)  # the CUDA context exists at idle, as in a serving process
        with PowerSampler(nvml, handle) as idle:
            time.sleep(args.idle_seconds)
        result["idle"] = idle.result
        print("idle", idle.result)
    else:
        result["device"] = f"cpu ({platform.processor() or platform.machine()}), code check only"
    result["models"] = []
    for name in models:
        batches = [b for b in map(int, args.batches.split(",")) if b <= MAX_BATCH.get(name, b)]
        try:
            result["models"].append(profile_model(SHAPES[name], device, nvml, handle, batches, args.seconds))
        except torch.OutOfMemoryError as exc:  # the largest shape may not fit: keep what the others measured
            result["models"].append({"shape": asdict(SHAPES[name]), "error": f"out of memory: {exc}"[:300]})
            print(name, "out of memory")
        # Written after each model, so a run stopped at its time limit keeps what it measured.
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps({m["shape"]["name"]: m.get("batch_slowdown_alpha") for m in result["models"]}))


if __name__ == "__main__":
    main()
