"""fedae's progress lines where a deployed process's output goes.

``fedae simulate`` and the other commands set up their own handler (fedae/cli.py). A ServerApp or
ClientApp started by Flower's SuperLink or SuperNode has none: Flower streams what the process writes to
stderr (``flwr log``), so fedae's loggers get a handler on the stderr of that moment.
"""

from __future__ import annotations

import logging


def log_to_stderr() -> None:
    """Give the ``fedae`` loggers an INFO handler on the current ``sys.stderr`` unless they have one."""
    logger = logging.getLogger("fedae")
    if logger.handlers:
        return
    handler = logging.StreamHandler()  # binds sys.stderr now: after Flower has redirected it
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
