"""The infinibrain cluster manager daemon (installed as ``infinibrain.manager``).

Import only: nothing here runs on a thread of its own.
"""
from infinibrain import __version__

__all__ = ["__version__"]
