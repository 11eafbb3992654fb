from seqr_router.v1 import library_pb2 as _library_pb2
from seqr_router.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InputForm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_FORM_UNSPECIFIED: _ClassVar[InputForm]
    ACTIVATIONS: _ClassVar[InputForm]
    PROJECTED: _ClassVar[InputForm]
    MOMENTS: _ClassVar[InputForm]

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    SEQR: _ClassVar[Method]
    EXACT: _ClassVar[Method]
    SPECTR: _ClassVar[Method]
    ARROW: _ClassVar[Method]
    LAG: _ClassVar[Method]

class Granularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANULARITY_UNSPECIFIED: _ClassVar[Granularity]
    SEQUENCE: _ClassVar[Granularity]
    TOKEN: _ClassVar[Granularity]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    MEAN: _ClassVar[Aggregation]
    VOTE: _ClassVar[Aggregation]
INPUT_FORM_UNSPECIFIED: InputForm
ACTIVATIONS: InputForm
PROJECTED: InputForm
MOMENTS: InputForm
METHOD_UNSPECIFIED: Method
SEQR: Method
EXACT: Method
SPECTR: Method
ARROW: Method
LAG: Method
GRANULARITY_UNSPECIFIED: Granularity
SEQUENCE: Granularity
TOKEN: Granularity
AGGREGATION_UNSPECIFIED: Aggregation
MEAN: Aggregation
VOTE: Aggregation

class ModuleInput(_message.Message):
    __slots__ = ("module", "form", "tensor", "tokens")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    module: str
    form: InputForm
    tensor: str
    tokens: int
    def __init__(self, module: _Optional[str] = ..., form: _Optional[_Union[InputForm, str]] = ..., tensor: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class Normalisation(_message.Message):
    __slots__ = ("kind", "granularity", "transform")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Normalisation.Kind]
        NONE: _ClassVar[Normalisation.Kind]
        FROBENIUS: _ClassVar[Normalisation.Kind]
        ACTIVATION: _ClassVar[Normalisation.Kind]
        ZSCORE: _ClassVar[Normalisation.Kind]
    KIND_UNSPECIFIED: Normalisation.Kind
    NONE: Normalisation.Kind
    FROBENIUS: Normalisation.Kind
    ACTIVATION: Normalisation.Kind
    ZSCORE: Normalisation.Kind
    class ZGranularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        Z_GRANULARITY_UNSPECIFIED: _ClassVar[Normalisation.ZGranularity]
        ADAPTER_MODULE: _ClassVar[Normalisation.ZGranularity]
        ADAPTER: _ClassVar[Normalisation.ZGranularity]
    Z_GRANULARITY_UNSPECIFIED: Normalisation.ZGranularity
    ADAPTER_MODULE: Normalisation.ZGranularity
    ADAPTER: Normalisation.ZGranularity
    class Transform(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TRANSFORM_UNSPECIFIED: _ClassVar[Normalisation.Transform]
        E: _ClassVar[Normalisation.Transform]
        SQRT: _ClassVar[Normalisation.Transform]
        LOG: _ClassVar[Normalisation.Transform]
    TRANSFORM_UNSPECIFIED: Normalisation.Transform
    E: Normalisation.Transform
    SQRT: Normalisation.Transform
    LOG: Normalisation.Transform
    KIND_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    kind: Normalisation.Kind
    granularity: Normalisation.ZGranularity
    transform: Normalisation.Transform
    def __init__(self, kind: _Optional[_Union[Normalisation.Kind, str]] = ..., granularity: _Optional[_Union[Normalisation.ZGranularity, str]] = ..., transform: _Optional[_Union[Normalisation.Transform, str]] = ...) -> None: ...

class RouteOptions(_message.Message):
    __slots__ = ("method", "normalisation", "granularity", "aggregation", "top_k", "temperature", "candidates", "lag_k", "include_scores")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NORMALISATION_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    LAG_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SCORES_FIELD_NUMBER: _ClassVar[int]
    method: Method
    normalisation: Normalisation
    granularity: Granularity
    aggregation: Aggregation
    top_k: int
    temperature: float
    candidates: _containers.RepeatedScalarFieldContainer[str]
    lag_k: int
    include_scores: bool
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., normalisation: _Optional[_Union[Normalisation, _Mapping]] = ..., granularity: _Optional[_Union[Granularity, str]] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., top_k: _Optional[int] = ..., temperature: _Optional[float] = ..., candidates: _Optional[_Iterable[str]] = ..., lag_k: _Optional[int] = ..., include_scores: _Optional[bool] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("library", "tensors", "inputs", "options")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    library: str
    tensors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    inputs: _containers.RepeatedCompositeFieldContainer[ModuleInput]
    options: RouteOptions
    def __init__(self, library: _Optional[str] = ..., tensors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., inputs: _Optional[_Iterable[_Union[ModuleInput, _Mapping]]] = ..., options: _Optional[_Union[RouteOptions, _Mapping]] = ...) -> None: ...

class Choice(_message.Message):
    __slots__ = ("name", "adapter_id", "score", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    adapter_id: int
    score: float
    weight: float
    def __init__(self, name: _Optional[str] = ..., adapter_id: _Optional[int] = ..., score: _Optional[float] = ..., weight: _Optional[float] = ...) -> None: ...

class TokenDecisions(_message.Message):
    __slots__ = ("adapter_ids", "scores")
    ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    adapter_ids: _tensor_pb2.Tensor
    scores: _tensor_pb2.Tensor
    def __init__(self, adapter_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., scores: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "score_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    SCORE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    score_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., score_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("choices", "margin", "library_version", "method", "normalisation", "fallback", "rechecked", "tokens", "timings", "scores")
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NORMALISATION_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    RECHECKED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    choices: _containers.RepeatedCompositeFieldContainer[Choice]
    margin: float
    library_version: int
    method: str
    normalisation: str
    fallback: str
    rechecked: int
    tokens: TokenDecisions
    timings: Timings
    scores: _containers.RepeatedCompositeFieldContainer[Choice]
    def __init__(self, choices: _Optional[_Iterable[_Union[Choice, _Mapping]]] = ..., margin: _Optional[float] = ..., library_version: _Optional[int] = ..., method: _Optional[str] = ..., normalisation: _Optional[str] = ..., fallback: _Optional[str] = ..., rechecked: _Optional[int] = ..., tokens: _Optional[_Union[TokenDecisions, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., scores: _Optional[_Iterable[_Union[Choice, _Mapping]]] = ...) -> None: ...

class DescribeLibraryRequest(_message.Message):
    __slots__ = ("library", "include_shared_a", "include_background")
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SHARED_A_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    library: str
    include_shared_a: bool
    include_background: bool
    def __init__(self, library: _Optional[str] = ..., include_shared_a: _Optional[bool] = ..., include_background: _Optional[bool] = ...) -> None: ...
