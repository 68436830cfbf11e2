"""infinibrain: a ZeroMQ distributed inference cluster runtime (Infini-Brain SDK API).

The host API is ``infinibrain.inference.AICluster`` with ``CoprocessorHandler``
(``infinibrain.coprocessor``) and ``ContainerHandler`` (``infinibrain.container``); inside
containers, ``infinibrain.containers`` gives ``Connector`` and the log functions. Every
data class and exception is importable from here too.

Import only: nothing here runs on a thread of its own.
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
from typing import TYPE_CHECKING, Any

# The host side (AICluster and its handlers) is imported when first used: a container that
# imports infinibrain.containers loads only the errors, the data classes and the wire
# protocol (and runs on Python 3.8, JetPack 5's).
_LAZY = {
    "AICluster": "inference",
    "wait_for_manager": "inference",
    "ContainerHandler": "container",
    "CoprocessorHandler": "coprocessor",
    "RetryPolicy": "retry",
}

if TYPE_CHECKING:  # pragma: no cover
    from .container import ContainerHandler
    from .coprocessor import CoprocessorHandler
    from .inference import AICluster, wait_for_manager
    from .retry import RetryPolicy


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'infinibrain' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

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
