"""The in-container library: Connector and the container_log_util functions.

The container program's threads: one Connector per thread (one per module).
"""
from . import container_log_util
from .connector import Connector
from .container_log_util import critical, debug, error, exception, info, log_setting, warning

__all__ = ["Connector", "container_log_util", "log_setting", "debug", "info", "warning", "error", "critical", "exception"]
