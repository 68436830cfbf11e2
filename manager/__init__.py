"""The infinibrain cluster manager daemon (installed as ``infinibrain.manager``)."""
from infinibrain import __version__

__all__ = ["__version__"]
