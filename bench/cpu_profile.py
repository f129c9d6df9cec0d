"""llama.cpp's prefill and decode rates on this CPU, on the generated tiny models (device, edge, cloud).

The tiny models have random weights and 0.1-3M parameters, so the rates are far above what a real model gives on the
same CPU; they show the code path and how the rate falls with model size, not a real edge box's speed (the
edge-box profile in recserve.engines.profiles takes published figures for that). Prefill: one 256-token prompt
evaluated at once; decode: 128 tokens one at a time after it. Median of --repeats runs. Writes JSON (--out).

    PYTHONPATH=src python bench/cpu_profile.py --out docs/results/cpu_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import llama_cpp

from recserve.tools.models import TIERS_SIZES, make_tiny_models


def measure(gguf: Path, threads: int, prompt: int, decode: int, repeats: int) -> dict[str, Any]:
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=prompt + decode + 8, n_threads=threads, verbose=False)
    vocab = llm.n_vocab()
    tokens = [3 + (i * 7919) % (vocab - 3) for i in range(prompt)]
    prefill, step = [], []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        prefill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(decode):
            llm.eval([3 + (i * 31) % (vocab - 3)])
        step.append((time.perf_counter() - t0) / decode)
    return {
        "prefill_tokens_per_s": round(prompt / statistics.median(prefill), 1),
        "decode_tokens_per_s": round(1 / statistics.median(step), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="cpu_profile.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "method": "bench/cpu_profile.py: llama.cpp (llama-cpp-python), generated tiny models, 256-token prompt, "
        "128 decoded tokens, median of repeats",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "llama_cpp_python": llama_cpp.__version__,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_models(Path(tmp))
        for tier, path in paths.items():
            row = measure(path.gguf, args.threads, 256, 128, args.repeats)
            size = TIERS_SIZES[tier]
            row["shape"] = f"{size.layers} layers x {size.hidden} wide"
            result["models"][tier] = row
            print(tier, row)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
