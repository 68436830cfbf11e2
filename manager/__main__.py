"""``python -m infinibrain.manager``: the daemon (daemon.py), on the main thread."""
import sys

from .daemon import main

sys.exit(main())
