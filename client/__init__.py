"""seqr_client: the typed Python client of seqr-router (numpy in, frozen dataclasses out).

Import stays light (grpc + numpy): the model-host helpers that need torch live in
``seqr_client.hf_models`` / ``seqr_client.hf_host`` and are imported explicitly.
"""

from .channel import channel_options, make_channel, tls_credentials
from .errors import (AdapterFolderError, AlreadyExistsError, CancelledError, DeadlineExceededError, FailedPreconditionError,
                     IntegrityError, InternalError, InvalidArgumentError, LimitExceededError, NotFoundError,
                     PermissionDeniedError, SeqrError, UnauthenticatedError, UnavailableError,
                     UnimplementedError)
from .results import (AdapterInfo, CalibrationResult, Choice, DeleteResult, LibraryInfo, LibrarySummary,
                      ModuleInfo, RouteResult, SharedARecipe, Timings, TokenChoices)
from .router_client import RouterClient, moments, read_peft_dir

import types as _types

__all__ = [n for n, v in dict(globals()).items()
           if not n.startswith("_") and not isinstance(v, _types.ModuleType)]
