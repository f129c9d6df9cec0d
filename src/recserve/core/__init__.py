"""The serving core: a tier (generate → score → decide → answer or forward) and the pieces it is made of.

Confidence scoring, windowed quantiles, calibration, the judge, the circuit breaker and the forward timeout,
metrics, domain errors, trace loading, the engine and offload-policy interfaces, and the upstream link (with an
in-process one for replay).
Imports only `recserve.v1`'s protobuf messages (never gRPC) and third-party libraries: every adapter, the policies,
the engines, the evaluation and the tools build on it, and it builds on none of them.
"""
