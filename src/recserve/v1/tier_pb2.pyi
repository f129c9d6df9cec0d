from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_GENERATE: _ClassVar[TaskKind]
    TASK_KIND_CHOICE: _ClassVar[TaskKind]
    TASK_KIND_SKETCH: _ClassVar[TaskKind]
    TASK_KIND_EXPAND: _ClassVar[TaskKind]

class OffloadMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OFFLOAD_MODE_AUTO: _ClassVar[OffloadMode]
    OFFLOAD_MODE_LOCAL_ONLY: _ClassVar[OffloadMode]
    OFFLOAD_MODE_LAST_TIER: _ClassVar[OffloadMode]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ANSWERED: _ClassVar[Decision]
    DECISION_FORWARDED: _ClassVar[Decision]
    DECISION_DEGRADED: _ClassVar[Decision]
    DECISION_PROGRESSIVE: _ClassVar[Decision]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_GENERATE: TaskKind
TASK_KIND_CHOICE: TaskKind
TASK_KIND_SKETCH: TaskKind
TASK_KIND_EXPAND: TaskKind
OFFLOAD_MODE_AUTO: OffloadMode
OFFLOAD_MODE_LOCAL_ONLY: OffloadMode
OFFLOAD_MODE_LAST_TIER: OffloadMode
DECISION_UNSPECIFIED: Decision
DECISION_ANSWERED: Decision
DECISION_FORWARDED: Decision
DECISION_DEGRADED: Decision
DECISION_PROGRESSIVE: Decision

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "stop", "logprobs")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    logprobs: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., logprobs: _Optional[bool] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: str
    logprob: float
    def __init__(self, token: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("tier", "confidence", "threshold", "decision", "engine_seconds", "bytes_sent", "bytes_received", "answer", "inference_joules", "transmission_joules", "progressive", "byte_price")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_JOULES_FIELD_NUMBER: _ClassVar[int]
    TRANSMISSION_JOULES_FIELD_NUMBER: _ClassVar[int]
    PROGRESSIVE_FIELD_NUMBER: _ClassVar[int]
    BYTE_PRICE_FIELD_NUMBER: _ClassVar[int]
    tier: str
    confidence: float
    threshold: float
    decision: Decision
    engine_seconds: float
    bytes_sent: int
    bytes_received: int
    answer: str
    inference_joules: float
    transmission_joules: float
    progressive: Progressive
    byte_price: float
    def __init__(self, tier: _Optional[str] = ..., confidence: _Optional[float] = ..., threshold: _Optional[float] = ..., decision: _Optional[_Union[Decision, str]] = ..., engine_seconds: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., answer: _Optional[str] = ..., inference_joules: _Optional[float] = ..., transmission_joules: _Optional[float] = ..., progressive: _Optional[_Union[Progressive, _Mapping]] = ..., byte_price: _Optional[float] = ...) -> None: ...

class Progressive(_message.Message):
    __slots__ = ("points", "sketched_by", "sketch_tokens", "expansions")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    SKETCHED_BY_FIELD_NUMBER: _ClassVar[int]
    SKETCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPANSIONS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedScalarFieldContainer[str]
    sketched_by: str
    sketch_tokens: int
    expansions: _containers.RepeatedCompositeFieldContainer[PointExpansion]
    def __init__(self, points: _Optional[_Iterable[str]] = ..., sketched_by: _Optional[str] = ..., sketch_tokens: _Optional[int] = ..., expansions: _Optional[_Iterable[_Union[PointExpansion, _Mapping]]] = ...) -> None: ...

class PointExpansion(_message.Message):
    __slots__ = ("engine_seconds", "confidence", "threshold", "repaired_by", "completion_tokens", "ensemble_confidence", "ensemble_kept")
    ENGINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_BY_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_KEPT_FIELD_NUMBER: _ClassVar[int]
    engine_seconds: float
    confidence: float
    threshold: float
    repaired_by: str
    completion_tokens: int
    ensemble_confidence: float
    ensemble_kept: bool
    def __init__(self, engine_seconds: _Optional[float] = ..., confidence: _Optional[float] = ..., threshold: _Optional[float] = ..., repaired_by: _Optional[str] = ..., completion_tokens: _Optional[int] = ..., ensemble_confidence: _Optional[float] = ..., ensemble_kept: _Optional[bool] = ...) -> None: ...

class SketchParams(_message.Message):
    __slots__ = ("max_points", "max_words")
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORDS_FIELD_NUMBER: _ClassVar[int]
    max_points: int
    max_words: int
    def __init__(self, max_points: _Optional[int] = ..., max_words: _Optional[int] = ...) -> None: ...

class ExpandParams(_message.Message):
    __slots__ = ("points", "index")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedScalarFieldContainer[str]
    index: int
    def __init__(self, points: _Optional[_Iterable[str]] = ..., index: _Optional[int] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "system_prompt", "task", "options", "family", "sampling", "reference", "offload", "hops", "messages", "requirement_seconds", "service_class", "sketch", "expand")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    SKETCH_FIELD_NUMBER: _ClassVar[int]
    EXPAND_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    system_prompt: str
    task: TaskKind
    options: _containers.RepeatedScalarFieldContainer[str]
    family: str
    sampling: SamplingParams
    reference: str
    offload: OffloadMode
    hops: _containers.RepeatedCompositeFieldContainer[Hop]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    requirement_seconds: float
    service_class: str
    sketch: SketchParams
    expand: ExpandParams
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., system_prompt: _Optional[str] = ..., task: _Optional[_Union[TaskKind, str]] = ..., options: _Optional[_Iterable[str]] = ..., family: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., reference: _Optional[str] = ..., offload: _Optional[_Union[OffloadMode, str]] = ..., hops: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., requirement_seconds: _Optional[float] = ..., service_class: _Optional[str] = ..., sketch: _Optional[_Union[SketchParams, _Mapping]] = ..., expand: _Optional[_Union[ExpandParams, _Mapping]] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("in_flight", "capacity")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    capacity: int
    def __init__(self, in_flight: _Optional[int] = ..., capacity: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class Confidence(_message.Message):
    __slots__ = ("value", "mean_logprob", "min_logprob", "first_token_margin")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    MIN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_MARGIN_FIELD_NUMBER: _ClassVar[int]
    value: float
    mean_logprob: float
    min_logprob: float
    first_token_margin: float
    def __init__(self, value: _Optional[float] = ..., mean_logprob: _Optional[float] = ..., min_logprob: _Optional[float] = ..., first_token_margin: _Optional[float] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "answer", "chosen_option", "answered_by", "confidence", "hops", "usage", "degraded", "logprobs", "finish_reason", "points", "load")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_OPTION_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    answer: str
    chosen_option: str
    answered_by: str
    confidence: Confidence
    hops: _containers.RepeatedCompositeFieldContainer[Hop]
    usage: Usage
    degraded: bool
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    finish_reason: str
    points: _containers.RepeatedScalarFieldContainer[str]
    load: Load
    def __init__(self, request_id: _Optional[str] = ..., answer: _Optional[str] = ..., chosen_option: _Optional[str] = ..., answered_by: _Optional[str] = ..., confidence: _Optional[_Union[Confidence, _Mapping]] = ..., hops: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., degraded: _Optional[bool] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., points: _Optional[_Iterable[str]] = ..., load: _Optional[_Union[Load, _Mapping]] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("text", "logprobs", "tier")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    tier: str
    def __init__(self, text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., tier: _Optional[str] = ...) -> None: ...

class InferStreamResponse(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: TokenDelta
    final: InferResponse
    def __init__(self, delta: _Optional[_Union[TokenDelta, _Mapping]] = ..., final: _Optional[_Union[InferResponse, _Mapping]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "correct")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    correct: bool
    def __init__(self, request_id: _Optional[str] = ..., correct: _Optional[bool] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("recorded_by",)
    RECORDED_BY_FIELD_NUMBER: _ClassVar[int]
    recorded_by: str
    def __init__(self, recorded_by: _Optional[str] = ...) -> None: ...
