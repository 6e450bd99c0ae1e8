"""Progress bars for long work: tqdm on stderr, shown only when stderr is a terminal and the
user did not ask for quiet (``dfm --quiet``), so logs and pipes stay free of bar redraws."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or allow again) every bar this process draws from now on."""
    global _quiet
    _quiet = quiet


def quiet() -> bool:
    """Whether bars were silenced (``set_quiet``)."""
    return _quiet


def shown() -> bool:
    """Whether bars appear: not quiet, and stderr is a terminal (for libraries with their own bars)."""
    return not _quiet and sys.stderr.isatty()


def progress(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    **options: Any,
) -> tqdm:
    """A tqdm bar on stderr; off under quiet, when ``enabled`` is false (e.g. a non-main rank)
    and when stderr is not a terminal."""
    disable = True if _quiet or not enabled else None  # None: tqdm turns itself off on a non-terminal
    return tqdm(
        iterable, desc=desc, total=total, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True, **options
    )
