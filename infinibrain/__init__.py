"""infinibrain: a ZeroMQ distributed inference cluster runtime (Infini-Brain SDK API).

The host API is ``infinibrain.inference.AICluster`` with ``CoprocessorHandler``
(``infinibrain.coprocessor``) and ``ContainerHandler`` (``infinibrain.container``); inside
containers, ``infinibrain.containers`` gives ``Connector`` and the log functions. Every
data class and exception is importable from here too.
"""
__version__ = "0.1.0"

from .errors import *  # noqa: F401,F403 - the exception classes (errors.EXCEPTIONS) are public API
from .errors import EXCEPTIONS as _error_names
from .errors import NotImplemented  # noqa: A004 - the reference's short name, by name only (not in __all__)
from .types import (
    ContainerConfig,
    ContainerDistributionStatus,
    ContainerStatus,
    CoprocessorImages,
    InferenceModulesConfig,
    InferenceResponse,
    QueueInfo,
)
from .container import ContainerHandler  # noqa: E402
from .coprocessor import CoprocessorHandler  # noqa: E402
from .inference import AICluster, wait_for_manager  # noqa: E402
from .retry import RetryPolicy  # noqa: E402

__all__ = [
    "__version__",
    "AICluster",
    "RetryPolicy",
    "wait_for_manager",
    "CoprocessorHandler",
    "ContainerHandler",
    "ContainerConfig",
    "ContainerDistributionStatus",
    "ContainerStatus",
    "CoprocessorImages",
    "InferenceModulesConfig",
    "InferenceResponse",
    "QueueInfo",
    *_error_names,
]
