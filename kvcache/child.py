"""How kvcache starts another Python process: this interpreter, in safe-path mode (``-P``).

Python started with ``-m`` or ``-c`` puts the working directory first on ``sys.path``, so a folder
there named like an installed package shadows it (the repository's ``kernels/`` next to Hugging
Face's ``kernels``, which transformers imports). ``-P`` leaves the working directory out: a child
imports exactly the packages installed in the environment, from whatever folder it starts in.

Not here: the environment a child gets (each caller builds its own) or how it is supervised.
"""

from __future__ import annotations

import sys

__all__ = ["python_argv"]


def python_argv(*args: str) -> list[str]:
    """``[sys.executable, "-P", *args]``: e.g. ``python_argv("-m", "kvcache.cli", "worker")``."""
    return [sys.executable, "-P", *args]
