"""Progress bars that stay quiet where nobody watches them.

A bar is drawn only when its stream (stderr) is a terminal: redrawn with carriage returns, it
would fill a log file with partial lines. Where the bar is off, long loops log one plain line
per evaluation instead (see :func:`interactive`).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether stderr is a terminal (where progress bars go)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Optional[Iterable] = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, drawn only when ``enabled`` and stderr is a terminal."""
    return tqdm(iterable, disable=not (enabled and interactive()), dynamic_ncols=True, **kwargs)


__all__ = ["interactive", "progress"]
