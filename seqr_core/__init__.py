"""seqr_core: exact SEQR routing of LLM requests to LoRA adapters. Pure numerics.

numpy in, numpy out: no files, sockets, keys or gRPC here (torch/onnx only in ``onnx_export``).
"""

from .adapter_index import AdapterIndex, IndexFormatError
from .adapters import Adapter, ModuleFactors, peft_scale
from .calibration import CalibrationStats, Calibrator, derived_stats, merge_into
from .energies import ModuleInput
from .errors import (AlreadyExistsError, FailedPreconditionError, IntegrityError,
                     InvalidArgumentError, LimitExceededError, NotFoundError, SeqrError,
                     UnavailableError)
from .moments import MomentPool
from .normalise import Normalisation
from .peft_io import ParsedAdapter, parse_peft_adapter, read_safetensors, write_safetensors
from .qr_index import AdapterEntry, LibraryIndex
from .routing import Choice, Decision, RouteOptions, TokenDecisions, route
from .shared_a import SharedARecipe, generate_shared_a
from .signature import BaseModelSignature, ModuleSpec, llama_signature, signature_from_hf_config

__all__ = [n for n in dir() if not n.startswith("_")]
