from seqr_router.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_KIND_UNSPECIFIED: _ClassVar[AdapterKind]
    SHARED_A: _ClassVar[AdapterKind]
    GENERAL: _ClassVar[AdapterKind]
    MIXED: _ClassVar[AdapterKind]

class AdapterStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATUS_UNSPECIFIED: _ClassVar[AdapterStatus]
    ADAPTER_READY: _ClassVar[AdapterStatus]
    ADAPTER_DAMAGED: _ClassVar[AdapterStatus]
ADAPTER_KIND_UNSPECIFIED: AdapterKind
SHARED_A: AdapterKind
GENERAL: AdapterKind
MIXED: AdapterKind
ADAPTER_STATUS_UNSPECIFIED: AdapterStatus
ADAPTER_READY: AdapterStatus
ADAPTER_DAMAGED: AdapterStatus

class ModuleSpec(_message.Message):
    __slots__ = ("name", "d_in", "d_out", "shared_rank")
    NAME_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_OUT_FIELD_NUMBER: _ClassVar[int]
    SHARED_RANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    d_in: int
    d_out: int
    shared_rank: int
    def __init__(self, name: _Optional[str] = ..., d_in: _Optional[int] = ..., d_out: _Optional[int] = ..., shared_rank: _Optional[int] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("base_model", "modules")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    modules: _containers.RepeatedCompositeFieldContainer[ModuleSpec]
    def __init__(self, base_model: _Optional[str] = ..., modules: _Optional[_Iterable[_Union[ModuleSpec, _Mapping]]] = ...) -> None: ...

class SharedARecipe(_message.Message):
    __slots__ = ("seed", "scheme", "rng")
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    RNG_FIELD_NUMBER: _ClassVar[int]
    seed: int
    scheme: str
    rng: str
    def __init__(self, seed: _Optional[int] = ..., scheme: _Optional[str] = ..., rng: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("name", "adapter_id", "kind", "rank", "modules", "upload_dtype", "created_at", "sha256", "size_bytes", "meta", "calibrated", "status", "damaged_reason", "version")
    class Sha256Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    adapter_id: int
    kind: AdapterKind
    rank: int
    modules: _containers.RepeatedScalarFieldContainer[str]
    upload_dtype: str
    created_at: str
    sha256: _containers.ScalarMap[str, str]
    size_bytes: int
    meta: _containers.ScalarMap[str, str]
    calibrated: bool
    status: AdapterStatus
    damaged_reason: str
    version: int
    def __init__(self, name: _Optional[str] = ..., adapter_id: _Optional[int] = ..., kind: _Optional[_Union[AdapterKind, str]] = ..., rank: _Optional[int] = ..., modules: _Optional[_Iterable[str]] = ..., upload_dtype: _Optional[str] = ..., created_at: _Optional[str] = ..., sha256: _Optional[_Mapping[str, str]] = ..., size_bytes: _Optional[int] = ..., meta: _Optional[_Mapping[str, str]] = ..., calibrated: _Optional[bool] = ..., status: _Optional[_Union[AdapterStatus, str]] = ..., damaged_reason: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class CalibrationInfo(_message.Message):
    __slots__ = ("sequences", "adapters", "pooled_sequences", "derived_adapters")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    POOLED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    DERIVED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    sequences: int
    adapters: _containers.RepeatedScalarFieldContainer[str]
    pooled_sequences: int
    derived_adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sequences: _Optional[int] = ..., adapters: _Optional[_Iterable[str]] = ..., pooled_sequences: _Optional[int] = ..., derived_adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class LibraryInfo(_message.Message):
    __slots__ = ("name", "version", "signature", "shared_a_recipe", "adapters", "calibration", "meta", "shared_a", "degraded", "damaged_objects", "shared_a_only", "background")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SharedAEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BackgroundEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SHARED_A_RECIPE_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SHARED_A_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    SHARED_A_ONLY_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    signature: Signature
    shared_a_recipe: SharedARecipe
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    calibration: CalibrationInfo
    meta: _containers.ScalarMap[str, str]
    shared_a: _containers.MessageMap[str, _tensor_pb2.Tensor]
    degraded: bool
    damaged_objects: _containers.RepeatedScalarFieldContainer[str]
    shared_a_only: bool
    background: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., signature: _Optional[_Union[Signature, _Mapping]] = ..., shared_a_recipe: _Optional[_Union[SharedARecipe, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., calibration: _Optional[_Union[CalibrationInfo, _Mapping]] = ..., meta: _Optional[_Mapping[str, str]] = ..., shared_a: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., degraded: _Optional[bool] = ..., damaged_objects: _Optional[_Iterable[str]] = ..., shared_a_only: _Optional[bool] = ..., background: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...
