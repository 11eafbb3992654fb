from seqr_router.v1 import library_pb2 as _library_pb2
from seqr_router.v1 import router_pb2 as _router_pb2
from seqr_router.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateLibraryRequest(_message.Message):
    __slots__ = ("name", "signature", "recipe", "uploaded", "shared_a_rank", "shared_a_modules", "meta", "shared_a_only")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_FIELD_NUMBER: _ClassVar[int]
    SHARED_A_RANK_FIELD_NUMBER: _ClassVar[int]
    SHARED_A_MODULES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SHARED_A_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    signature: _library_pb2.Signature
    recipe: _library_pb2.SharedARecipe
    uploaded: UploadedSharedA
    shared_a_rank: int
    shared_a_modules: _containers.RepeatedScalarFieldContainer[str]
    meta: _containers.ScalarMap[str, str]
    shared_a_only: bool
    def __init__(self, name: _Optional[str] = ..., signature: _Optional[_Union[_library_pb2.Signature, _Mapping]] = ..., recipe: _Optional[_Union[_library_pb2.SharedARecipe, _Mapping]] = ..., uploaded: _Optional[_Union[UploadedSharedA, _Mapping]] = ..., shared_a_rank: _Optional[int] = ..., shared_a_modules: _Optional[_Iterable[str]] = ..., meta: _Optional[_Mapping[str, str]] = ..., shared_a_only: _Optional[bool] = ...) -> None: ...

class UploadedSharedA(_message.Message):
    __slots__ = ("modules",)
    class ModulesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    MODULES_FIELD_NUMBER: _ClassVar[int]
    modules: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, modules: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class ListLibrariesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LibrarySummary(_message.Message):
    __slots__ = ("name", "version", "base_model", "adapters", "degraded", "damaged_adapters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    base_model: str
    adapters: int
    degraded: bool
    damaged_adapters: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., base_model: _Optional[str] = ..., adapters: _Optional[int] = ..., degraded: _Optional[bool] = ..., damaged_adapters: _Optional[int] = ...) -> None: ...

class ListLibrariesResponse(_message.Message):
    __slots__ = ("libraries",)
    LIBRARIES_FIELD_NUMBER: _ClassVar[int]
    libraries: _containers.RepeatedCompositeFieldContainer[LibrarySummary]
    def __init__(self, libraries: _Optional[_Iterable[_Union[LibrarySummary, _Mapping]]] = ...) -> None: ...

class FileHeader(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PutAdapterHeader(_message.Message):
    __slots__ = ("library", "name", "files", "meta", "allow_general", "replace")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    ALLOW_GENERAL_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    library: str
    name: str
    files: _containers.RepeatedCompositeFieldContainer[FileHeader]
    meta: _containers.ScalarMap[str, str]
    allow_general: bool
    replace: bool
    def __init__(self, library: _Optional[str] = ..., name: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileHeader, _Mapping]]] = ..., meta: _Optional[_Mapping[str, str]] = ..., allow_general: _Optional[bool] = ..., replace: _Optional[bool] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class PutAdapterRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PutAdapterHeader
    chunk: FileChunk
    def __init__(self, header: _Optional[_Union[PutAdapterHeader, _Mapping]] = ..., chunk: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class PutAdapterResponse(_message.Message):
    __slots__ = ("adapter", "library_version")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter: _library_pb2.AdapterInfo
    library_version: int
    def __init__(self, adapter: _Optional[_Union[_library_pb2.AdapterInfo, _Mapping]] = ..., library_version: _Optional[int] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("library", "name")
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    library: str
    name: str
    def __init__(self, library: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("name", "adapter_id", "library_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    adapter_id: int
    library_version: int
    def __init__(self, name: _Optional[str] = ..., adapter_id: _Optional[int] = ..., library_version: _Optional[int] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("library",)
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    library: str
    def __init__(self, library: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "library_version")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[_library_pb2.AdapterInfo]
    library_version: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[_library_pb2.AdapterInfo, _Mapping]]] = ..., library_version: _Optional[int] = ...) -> None: ...

class CalibrateRequest(_message.Message):
    __slots__ = ("library", "tensors", "inputs")
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
    library: str
    tensors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    inputs: _containers.RepeatedCompositeFieldContainer[_router_pb2.ModuleInput]
    def __init__(self, library: _Optional[str] = ..., tensors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., inputs: _Optional[_Iterable[_Union[_router_pb2.ModuleInput, _Mapping]]] = ...) -> None: ...

class CalibrateResponse(_message.Message):
    __slots__ = ("sequences", "adapters", "library_version", "pooled_moments_updated")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    POOLED_MOMENTS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    sequences: int
    adapters: _containers.RepeatedScalarFieldContainer[str]
    library_version: int
    pooled_moments_updated: bool
    def __init__(self, sequences: _Optional[int] = ..., adapters: _Optional[_Iterable[str]] = ..., library_version: _Optional[int] = ..., pooled_moments_updated: _Optional[bool] = ...) -> None: ...

class ExportScorerRequest(_message.Message):
    __slots__ = ("library", "form", "tokens")
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    library: str
    form: _router_pb2.InputForm
    tokens: int
    def __init__(self, library: _Optional[str] = ..., form: _Optional[_Union[_router_pb2.InputForm, str]] = ..., tokens: _Optional[int] = ...) -> None: ...

class ExportScorerChunk(_message.Message):
    __slots__ = ("data", "library_version")
    DATA_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    library_version: int
    def __init__(self, data: _Optional[bytes] = ..., library_version: _Optional[int] = ...) -> None: ...
