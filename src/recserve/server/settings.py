"""Typed tier settings: every option a `recserve serve` flag and a RECSERVE_* variable, validated at start-up."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from recserve.core.confidence import CHOICE_SCORERS, GENERATE_SCORERS
from recserve.core.energy import EnergyModel
from recserve.core.progressive import ProgressiveOptions
from recserve.core.tier import DEFAULT_CAPACITY, STREAM_INTERVAL_SECONDS
from recserve.core.validation import NAME_PATTERN, NAME_RULE, TierLimits
from recserve.engines import ENGINE_NAMES
from recserve.engines.config import EngineConfig
from recserve.engines.profiles import PROFILES, get_profile
from recserve.policies import (
    POLICY_ALIASES,
    POLICY_NAMES,
    LocalConfig,
    PolicyConfig,
    PolicyOption,
    policy_config,
    policy_options,
)
from recserve.policies.placement import (
    DEFAULT_PLACEMENT,
    PLACEMENT_NAMES,
    PinnedConfig,
    PlacementConfig,
    placement_config,
    placement_options,
)
from recserve.policies.progressive import ProgressiveConfig

ENV_PREFIX = "RECSERVE_"
INVALID = "invalid settings: "


def bool_flag(text: str | bool) -> bool:
    """Booleans from flags and variables: true/false, yes/no, on/off, 1/0."""
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class NextCandidate:
    name: str  # the peer label; empty: learned from its first reply
    address: str
    level: int


def parse_candidates(text: str) -> list[tuple[str, str]]:
    """`[NAME=]HOST:PORT,...` as (name or "", address) pairs; ValueError naming what is wrong."""
    candidates = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, address = item.rpartition("=")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{item!r} is not [NAME=]HOST:PORT")
        if name and not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"the name in {item!r} must be {NAME_RULE}")
        candidates.append((name, address))
    names = [name for name, _ in candidates if name]
    if len(set(names)) != len(names):
        raise ValueError("candidate names must be distinct")
    return candidates


@dataclass(frozen=True)
class Option:
    name: str  # the dataclass field; the flag is --name-with-dashes, the variable RECSERVE_NAME
    kind: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, choice): other names accepted for choices
    text: Callable[[Any], str] | None = None  # how a value is written as text, where its repr is not that
    env_prefix: str = ENV_PREFIX  # another command's options (the gateway's) read variables of their own prefix

    @classmethod
    def of_policy(cls, option: PolicyOption) -> Option:
        return cls(option.name, option.parse, option.default, option.help, text=option.text)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return self.env_prefix + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("tier", str, "", f"tier name (device, edge, cloud, ...: {NAME_RULE}); required"),
    Option("host", str, "[::]", "address to bind the gRPC server to"),
    Option("port", int, 50051, "gRPC port (0 picks a free one)"),
    Option("metrics_port", int, 0, "Prometheus /metrics HTTP port (0: no metrics endpoint)"),
    Option(
        "next",
        str,
        "",
        "HOST:PORT of the next tier, or several candidates [NAME=]HOST:PORT,... of which the placement picks one per "
        "request; empty for the last tier, which never forwards",
    ),
    Option(
        "skip_to",
        str,
        "",
        "candidates one tier beyond the next, [NAME=]HOST:PORT,...: a request may go there, skipping the next tier, "
        "when the placement finds that the only way to meet its requirement",
    ),
    Option("engine", str, "replay", "generation engine", ENGINE_NAMES),
    Option(
        "model",
        str,
        "",
        "model for the engine: a GGUF file (llama_cpp), a Hugging Face folder or hub id (vllm), "
        "the served model name (openai; empty: the server's first)",
    ),
    Option("traces", str, "", "trace folder for the replay engine"),
    Option("trace_model", str, "", "which model of the trace folder the replay engine serves"),
    Option("threads", int, 0, "engine threads (0: all cores)"),
    Option("context_length", int, 2048, "engine context window in tokens (vllm: max_model_len)"),
    Option("seed", int, 0, "engine sampling seed"),
    Option("dtype", str, "auto", "vllm: weight and activation dtype (auto: the checkpoint's on GPU, float32 on CPU)"),
    Option(
        "gpu_memory_utilization",
        float,
        0.0,
        "vllm: fraction of GPU memory (of RAM on CPU) for weights and KV cache; 0: 0.9 on GPU, a 1 GiB KV cache on CPU",
    ),
    Option("tensor_parallel_size", int, 1, "vllm: GPUs one model is split across"),
    Option("max_num_seqs", int, 0, "vllm: most requests batched together (0: vLLM's default)"),
    Option("base_url", str, "", "openai: base URL of an OpenAI-compatible server, e.g. http://HOST:8000/v1"),
    Option("api_key", str, "", "openai: bearer token for the server (empty: none)"),
    Option("request_timeout", float, 60.0, "openai: seconds to wait for the server, per request and at start-up"),
    Option(
        "emulate",
        str,
        "",
        "give the engine the speed, capacity and power of a server profile (a queue, continuous batching): "
        + ", ".join(PROFILES)
        + "; empty: the engine's own",
    ),
    Option(
        "emulate_replicas",
        int,
        1,
        "--emulate: identical servers of the profile behind this tier, e.g. a device tier standing for many phones",
    ),
    Option(
        "emulate_speed",
        float,
        1.0,
        "--emulate: wall-time speed against the profile (0.25: four times as slow; busy time and energy stay the "
        "profile's), to reach saturation at rates a benchmark's processes can drive",
    ),
    Option("busy_watts", float, 0.0, "energy: power above idle while the engine generates (0: the profile's, or none)"),
    Option("idle_watts", float, 0.0, "energy: power while idle, accounted over wall time (0: the profile's, or none)"),
    Option("joules_per_token", float, 0.0, "energy: joules per generated token, on top of busy_watts"),
    Option(
        "joules_per_byte", float, 0.0, "energy: joules per byte on this tier's links up (0: the profile's, or none)"
    ),
    Option(
        "power_reader",
        str,
        "auto",
        "where busy power comes from: auto (NVML on NVIDIA GPUs, else RAPL on Intel CPUs, else busy_watts) or none",
        ("auto", "none"),
    ),
    Option(
        "replay_delay_seconds",
        float,
        0.0,
        "replay: seconds before each streamed word, to emulate a model's generation speed (0: none)",
    ),
    Option("policy", str, "recserve", "offload policy", POLICY_NAMES, tuple(POLICY_ALIASES.items())),
    *map(Option.of_policy, policy_options()),
    Option(
        "placement",
        str,
        DEFAULT_PLACEMENT,
        "which next-tier candidate a forwarded request goes to (with several --next or --skip-to); first: the first "
        "usable one, as a plain cascade; docs/placement.md",
        PLACEMENT_NAMES,
    ),
    *map(Option.of_policy, placement_options()),
    Option("scorer", str, "perplexity", "confidence scorer for GENERATE tasks", tuple(GENERATE_SCORERS)),
    Option("choice_scorer", str, "option_probability", "confidence scorer for CHOICE tasks", tuple(CHOICE_SCORERS)),
    Option("max_prompt_chars", int, TierLimits.max_prompt_chars, "longest prompt + system prompt accepted"),
    Option("max_tokens", int, TierLimits.max_tokens, "largest max_tokens a request may ask for"),
    Option("default_max_tokens", int, TierLimits.default_max_tokens, "max_tokens when a request gives 0"),
    Option("max_hops", int, TierLimits.max_hops, "requests that crossed this many tiers are rejected"),
    Option("grace_seconds", float, 10.0, "on SIGTERM, how long in-flight requests may finish"),
    Option(
        "stream_interval",
        float,
        STREAM_INTERVAL_SECONDS,
        "a streaming tier sends what its engine made within this many seconds as one message (the first at once); "
        "0 sends every delta",
    ),
    Option(
        "progressive",
        str,
        "off",
        "on: a tier with a next tier chooses per long GENERATE request between progressive (the next tier sketches, "
        "this one expands the points; PICE), cloud-direct and local; docs/progressive.md",
        ("off", "on"),
    ),
    Option("progressive_sketch_words", int, 0, "progressive: words per sketch point (0: 5)"),
    Option(
        "progressive_point_beta",
        float,
        ProgressiveOptions.point_beta,
        "progressive: share of expanded points, the least confident, that the next tier writes again",
    ),
    Option(
        "progressive_point_window",
        int,
        ProgressiveOptions.point_window,
        "progressive: recent point confidences whose quantile is the point threshold",
    ),
    Option(
        "progressive_point_tokens",
        int,
        ProgressiveOptions.point_max_tokens,
        "progressive: max_tokens of an expanded point (0: the request's max_tokens over the sketch's points)",
    ),
    Option(
        "progressive_load_max_age",
        float,
        ProgressiveOptions.load_max_age_seconds,
        "progressive: seconds after which the next tier's last load report counts as none",
    ),
    Option(
        "progressive_ensemble_model",
        str,
        "",
        "progressive: a second model, on this tier's engine, that writes again the points the first is unsure of "
        "before the next tier is asked (kept when it clears the point threshold): a GGUF file (llama_cpp), a folder "
        "or hub id (vllm), a served model name (openai), a model of the trace folder (replay); empty: none",
    ),
    *(
        Option(
            f"progressive_{spec.name}", spec.parse, spec.default, f"progressive scheduler: {spec.help}", text=spec.text
        )
        for spec in ProgressiveConfig.options()
    ),
    Option("max_in_flight", int, DEFAULT_CAPACITY, "requests served at once; beyond, RESOURCE_EXHAUSTED at once"),
    Option(
        "forward_timeout",
        float,
        30.0,
        "longest wait for the next tier before answering here, degraded; the wait until 20 forwards were timed, "
        "then --forward-timeout-factor times their p99, at least --forward-timeout-min",
    ),
    Option(
        "forward_timeout_min",
        float,
        1.0,
        "shortest wait for the next tier, at most --forward-timeout (equal: a fixed wait)",
    ),
    Option("forward_timeout_factor", float, 3.0, "the wait for the next tier: this many times its recent p99 latency"),
    Option(
        "forward_share",
        float,
        0.5,
        "share of --max-in-flight that may wait on the next tier at once; beyond, requests are answered here, degraded",
    ),
    Option(
        "breaker_failures",
        int,
        3,
        "consecutive failed or slow calls (past half the forward timeout) that open the circuit breaker",
    ),
    Option("breaker_failure_rate", float, 0.5, "share of failed or slow calls, of the last 20, that opens the breaker"),
    Option("breaker_cooldown", float, 1.0, "seconds an open breaker waits before letting one probe through"),
    Option("tls_cert", str, "", "PEM certificate chain this tier serves with (TLS)"),
    Option("tls_key", str, "", "PEM private key for --tls-cert"),
    Option("tls_client_ca", str, "", "PEM CA bundle; when set, callers must present a certificate it signed (mTLS)"),
    Option("upstream_ca", str, "", "PEM CA bundle that signed the next tier's certificate (TLS to the next tier)"),
    Option("upstream_cert", str, "", "PEM certificate this tier presents to the next tier (mTLS)"),
    Option("upstream_key", str, "", "PEM private key for --upstream-cert"),
    Option("upstream_server_name", str, "", "name expected in the next tier's certificate (default: its host)"),
    Option(
        "auth_token",
        str,
        "",
        "when set, callers must send 'authorization: Bearer TOKEN' metadata (a flag shows in `ps`: prefer the "
        "variable or --auth-token-file)",
    ),
    Option("auth_token_file", str, "", "file holding --auth-token (instead of it)"),
    Option("upstream_auth_token", str, "", "bearer token this tier sends to the next tier"),
    Option("upstream_auth_token_file", str, "", "file holding --upstream-auth-token (instead of it)"),
    Option(
        "callers",
        str,
        "",
        "comma-separated names of the tiers that forward to this one; only their requests may carry hops "
        "(empty: a first tier, whose callers are clients)",
    ),
    Option("plaintext", bool_flag, False, "serve and forward without TLS; required when no certificates are given"),
    Option("metrics_host", str, "0.0.0.0", "address the metrics endpoint binds to, apart from the gRPC port"),
)


@dataclass(frozen=True)
class TierSettings:
    tier: str
    host: str
    port: int
    metrics_port: int
    next: str
    skip_to: str
    engine: str
    model: str
    traces: str
    trace_model: str
    threads: int
    context_length: int
    seed: int
    dtype: str
    gpu_memory_utilization: float
    tensor_parallel_size: int
    max_num_seqs: int
    base_url: str
    api_key: str
    request_timeout: float
    emulate: str
    emulate_replicas: int
    emulate_speed: float
    busy_watts: float
    idle_watts: float
    joules_per_token: float
    joules_per_byte: float
    power_reader: str
    replay_delay_seconds: float
    policy: PolicyConfig  # from --policy and that policy's options (the other policies' are ignored)
    placement: PlacementConfig  # from --placement and its options
    progressive: str
    progressive_sketch_words: int
    progressive_point_beta: float
    progressive_point_window: int
    progressive_point_tokens: int
    progressive_load_max_age: float
    progressive_ensemble_model: str
    progressive_scheduler: ProgressiveConfig  # from the --progressive-* options of the scheduler
    scorer: str
    choice_scorer: str
    max_prompt_chars: int
    max_tokens: int
    default_max_tokens: int
    max_hops: int
    grace_seconds: float
    stream_interval: float
    max_in_flight: int
    forward_timeout: float
    forward_timeout_min: float
    forward_timeout_factor: float
    forward_share: float
    breaker_failures: int
    breaker_failure_rate: float
    breaker_cooldown: float
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    upstream_ca: str
    upstream_cert: str
    upstream_key: str
    upstream_server_name: str
    auth_token: str
    auth_token_file: str
    upstream_auth_token: str
    upstream_auth_token_file: str
    callers: str
    plaintext: bool
    metrics_host: str

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError(INVALID + "; ".join(problems))

    def _problems(self) -> Iterator[str]:
        if not 0 <= self.progressive_sketch_words <= TierLimits.max_point_words:
            words = self.progressive_sketch_words
            yield f"progressive_sketch_words must be within 0-{TierLimits.max_point_words}, got {words}"
        if not 0.0 <= self.progressive_point_beta <= 1.0:
            yield f"progressive_point_beta must be within [0, 1], got {self.progressive_point_beta}"
        if self.progressive_point_window < 1 or self.progressive_point_tokens < 0:
            yield "progressive_point_window must be at least 1 and progressive_point_tokens not negative"
        if not self.progressive_load_max_age > 0:
            yield f"progressive_load_max_age must be positive, got {self.progressive_load_max_age}"
        if self.progressive_ensemble_model and self.progressive != "on":
            yield "--progressive-ensemble-model needs --progressive on: the second model writes sketch points"
        if not self.tier:
            yield "a tier name is required (--tier or RECSERVE_TIER)"
        for name in (self.tier, *self.caller_names):
            if name and not NAME_PATTERN.fullmatch(name):
                yield f"tier name {name!r} must be {NAME_RULE}"
        if self.tier in self.caller_names:
            yield f"tier {self.tier} cannot be its own caller"
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                yield f"{name} must be within 0-65535"
        names: list[str] | None = []  # the candidates' names; None when one of the lists does not parse
        for flag, text in (("--next", self.next), ("--skip-to", self.skip_to)):
            try:
                parsed = parse_candidates(text)
            except ValueError as exc:
                names = None
                yield f"{flag}: {exc}"
            else:
                if names is not None:
                    names += [name for name, _ in parsed]
        if self.skip_to and not self.next:
            yield "--skip-to needs --next: a tier skips its next tier only when it has one"
        if isinstance(self.placement, PinnedConfig) and names and self.placement.placement_pin not in names:
            yield f"--placement-pin {self.placement.placement_pin!r} names no candidate; they are {', '.join(names)}"
        if self.engine == "replay" and not (self.traces and self.trace_model):
            yield "the replay engine needs --traces DIR and --trace-model MODEL"
        if self.engine == "llama_cpp" and not self.model:
            yield "the llama_cpp engine needs --model PATH.gguf"
        if self.engine == "vllm" and not self.model:
            yield "the vllm engine needs --model (a Hugging Face folder or hub id)"
        if self.engine == "openai" and not self.base_url:
            yield "the openai engine needs --base-url (an OpenAI-compatible server, e.g. http://HOST:8000/v1)"
        if not 0.0 <= self.gpu_memory_utilization <= 1.0:
            yield f"gpu_memory_utilization must be within [0, 1], got {self.gpu_memory_utilization}"
        if self.tensor_parallel_size < 1:
            yield f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}"
        if self.max_num_seqs < 0:
            yield f"max_num_seqs must not be negative, got {self.max_num_seqs}"
        if self.request_timeout <= 0:
            yield f"request_timeout must be positive, got {self.request_timeout}"
        if not (math.isfinite(self.emulate_speed) and self.emulate_speed > 0):
            yield f"emulate_speed must be positive, got {self.emulate_speed}"
        if self.emulate_replicas < 1:
            yield f"emulate_replicas must be at least 1, got {self.emulate_replicas}"
        if self.emulate and self.emulate not in PROFILES:
            yield f"--emulate: unknown server profile {self.emulate!r}; choose one of: {', '.join(PROFILES)}"
        for name in ("busy_watts", "idle_watts", "joules_per_token", "joules_per_byte"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                yield f"{name} must be a number of at least 0, got {value}"
        if not 0 <= self.replay_delay_seconds <= 60:
            yield f"replay_delay_seconds must be within 0 and 60, got {self.replay_delay_seconds}"
        if not 1 <= self.default_max_tokens <= self.max_tokens:
            yield "default_max_tokens must be within 1 and max_tokens"
        yield from self._security_problems()
        if not self.stream_interval >= 0:
            yield f"stream_interval must be zero or positive seconds, got {self.stream_interval}"
        if self.max_in_flight < 1 or self.forward_timeout <= 0:
            yield "max_in_flight must be at least 1 and forward_timeout positive"
        if self.breaker_failures < 1 or self.breaker_cooldown <= 0:
            yield "breaker_failures must be at least 1 and breaker_cooldown positive"
        yield from self._forwarding_problems()
        if self.grace_seconds < 0:
            yield "grace_seconds must not be negative"

    def _forwarding_problems(self) -> Iterator[str]:
        if self.forward_timeout_min <= 0 or self.forward_timeout_factor < 1:
            yield "forward_timeout_min must be positive and forward_timeout_factor at least 1"
        if not 0 < self.forward_share <= 1 or not 0 < self.breaker_failure_rate <= 1:
            yield "forward_share and breaker_failure_rate must be shares within (0, 1]"

    def _security_problems(self) -> Iterator[str]:
        if bool(self.tls_cert) != bool(self.tls_key):
            yield "--tls-cert and --tls-key go together"
        if self.tls_client_ca and not self.tls_cert:
            yield "--tls-client-ca (mTLS) needs --tls-cert and --tls-key"
        if bool(self.upstream_cert) != bool(self.upstream_key):
            yield "--upstream-cert and --upstream-key go together"
        if (self.upstream_cert or self.upstream_server_name) and not self.upstream_ca:
            yield "--upstream-cert and --upstream-server-name need --upstream-ca"
        if not self.plaintext and not self.tls_cert:
            yield ("no TLS certificate given: pass --tls-cert and --tls-key (`make certs` makes development ones), "
                   "or --plaintext to serve unencrypted")  # fmt: skip
        if not self.plaintext and self.candidates and not self.upstream_ca:
            yield "--next without --upstream-ca would forward unencrypted: give --upstream-ca, or --plaintext"
        for name in ("auth_token", "upstream_auth_token"):
            if getattr(self, name) and getattr(self, f"{name}_file"):
                yield f"give {name} or {name}_file, not both"
        files = ("tls_cert", "tls_key", "tls_client_ca", "upstream_ca", "upstream_cert", "upstream_key")
        for name in (*files, "auth_token_file", "upstream_auth_token_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                yield f"{name} file {path!r} does not exist"

    @classmethod
    def with_defaults(cls, **overrides: Any) -> TierSettings:
        """Settings from the documented defaults, ignoring the environment (for embedding and tests); `policy`
        and the policy options are given by name, like the others."""
        unknown = overrides.keys() - {option.name for option in OPTIONS}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return _settings({option.name: option.default for option in OPTIONS} | overrides)

    @property
    def caller_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.callers.split(",") if name.strip())

    @property
    def candidates(self) -> list[NextCandidate]:
        """The next tier's candidates (level 1), then those one tier beyond (level 2)."""
        return [
            NextCandidate(name, address, level)
            for level, text in ((1, self.next), (2, self.skip_to))
            for name, address in parse_candidates(text)
        ]

    @property
    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            traces=self.traces,
            trace_model=self.trace_model,
            threads=self.threads,
            context_length=self.context_length,
            seed=self.seed,
            dtype=self.dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            max_num_seqs=self.max_num_seqs,
            base_url=self.base_url,
            api_key=self.api_key,
            request_timeout=self.request_timeout,
            replay_delay_seconds=self.replay_delay_seconds,
            emulate=self.emulate,
            emulate_replicas=self.emulate_replicas,
            emulate_speed=self.emulate_speed,
        )

    @property
    def ensemble_engine_config(self) -> EngineConfig | None:
        """The second model's engine: this tier's engine settings with its model; None without one."""
        if not self.progressive_ensemble_model:
            return None
        if self.engine == "replay":
            return replace(self.engine_config, trace_model=self.progressive_ensemble_model)
        return replace(self.engine_config, model=self.progressive_ensemble_model)

    @property
    def energy_model(self) -> EnergyModel:
        """The figures given, or, for an emulated server given none, its profile's."""
        given = EnergyModel(self.busy_watts, self.idle_watts, self.joules_per_token, self.joules_per_byte)
        if self.emulate and given == EnergyModel():
            return get_profile(self.emulate).energy_model()
        return given

    @property
    def progressive_options(self) -> ProgressiveOptions:
        return ProgressiveOptions(
            max_words=self.progressive_sketch_words,
            point_beta=self.progressive_point_beta,
            point_window=self.progressive_point_window,
            point_max_tokens=self.progressive_point_tokens,
            load_max_age_seconds=self.progressive_load_max_age,
        )

    @property
    def serving_capacity(self) -> int:
        """Requests the tier serves at once before they queue, as its replies report it to the tiers below: an
        emulated server's batch, vLLM's sequences, else what the tier admits."""
        if self.emulate:
            return get_profile(self.emulate).batch_limit * self.emulate_replicas
        if self.engine == "vllm" and self.max_num_seqs:
            return self.max_num_seqs
        return self.max_in_flight

    @property
    def forward_slots(self) -> int:
        """Requests that may wait on the next tier at once."""
        return max(1, int(self.max_in_flight * self.forward_share))

    @property
    def limits(self) -> TierLimits:
        return TierLimits(
            max_prompt_chars=self.max_prompt_chars,
            max_tokens=self.max_tokens,
            default_max_tokens=self.default_max_tokens,
            max_hops=self.max_hops,
        )


def add_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None, options: Sequence[Option] = OPTIONS
) -> None:
    """Add one flag per option (the tier's unless `options` are given); its default comes from the option's
    variable when that is set."""
    env = os.environ if env is None else env
    for option in options:
        raw = env.get(option.env)
        try:
            default = option.kind(raw) if raw is not None else option.default
        except ValueError as exc:
            reason = f"is not a valid {option.kind.__name__}" if option.kind in (int, float) else f"is not valid: {exc}"
            raise ValueError(f"{option.env}={raw!r} {reason}") from None
        # A boolean flag alone means true (`--plaintext`); it also takes a value (`--plaintext false`).
        switch: dict[str, Any] = {"nargs": "?", "const": True} if option.kind is bool_flag else {}
        parser.add_argument(
            option.flag,
            dest=option.name,
            type=_argument_type(option.kind),
            default=default,
            choices=(*option.choices, *(alias for alias, _ in option.aliases)) if option.choices else None,
            help=f"{option.help}{_aliases(option)} [env {option.env}, default {_default_text(option)}]",
            **switch,
        )


def _argument_type(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """`kind` for argparse, which reports a ValueError as "invalid <kind> value": other kinds say what is wrong."""
    if kind in (str, int, float):
        return kind

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = kind.__name__
    return parse


def _aliases(option: Option) -> str:
    return f"; aliases {', '.join(f'{alias} = {name}' for alias, name in option.aliases)}" if option.aliases else ""


def _default_text(option: Option) -> str:
    return repr(option.default if option.text is None else option.text(option.default))


def from_namespace(namespace: argparse.Namespace) -> TierSettings:
    return _settings({option.name: getattr(namespace, option.name) for option in OPTIONS})


def _settings(values: dict[str, Any]) -> TierSettings:
    """Settings from every option's value by name: `policy` and its options make the policy's configuration.
    What is wrong with the policy's options and with the others is said in one message."""
    built = ("policy", "placement", "progressive_scheduler")
    others = {f.name: values[f.name] for f in fields(TierSettings) if f.name not in built}
    problems = []
    policy: PolicyConfig = LocalConfig()  # a valid stand-in, to check the other settings too
    placement = placement_config(DEFAULT_PLACEMENT)
    scheduler = ProgressiveConfig()
    try:
        policy = policy_config(values["policy"], values)
    except ValueError as exc:
        problems.append(str(exc))
    try:
        placement = placement_config(values["placement"], values)
    except ValueError as exc:
        problems.append(str(exc))
    try:
        prefix = "progressive_"
        scheduler = ProgressiveConfig.from_values(
            {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}
        )
    except ValueError as exc:
        problems.append(str(exc))
    if not problems:
        return TierSettings(**others, policy=policy, placement=placement, progressive_scheduler=scheduler)
    try:
        TierSettings(**others, policy=policy, placement=placement, progressive_scheduler=scheduler)
    except ValueError as other:
        problems.append(str(other).removeprefix(INVALID))
    raise ValueError(INVALID + "; ".join(problems)) from None


def settings_table(options: Sequence[Option] = OPTIONS) -> str:
    """The Markdown table of every variable (the tier's unless `options` are given), as the README documents them."""
    rows = ["| variable | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for option in options:
        choices = f" ({', '.join(option.choices)}{_aliases(option)})" if option.choices else ""
        rows.append(f"| `{option.env}` | `{option.flag}` | `{_default_text(option)}` | {option.help}{choices} |")
    return "\n".join(rows)
