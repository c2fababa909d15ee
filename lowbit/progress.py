"""Progress bars (tqdm) that stay quiet when stderr is not a terminal or under CI."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def quiet() -> bool:
    return bool(os.environ.get("CI")) or not sys.stderr.isatty() or \
        os.environ.get("LOWBIT_QUIET") == "1"


def progress(iterable, desc: str = "", total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, disable=quiet(), leave=False, dynamic_ncols=True)
