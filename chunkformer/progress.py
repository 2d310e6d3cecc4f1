"""Progress of long loops: a tqdm bar on a terminal, a plain line every 30 s elsewhere.

    for step in progress(range(steps), desc="euler"):        # a bar on a TTY, lines on a pipe or log
        ...
    bar = Progress(total=batches * steps, desc="sample")     # one count across several loops
    for step in progress(range(steps), bar): ...

When standard error is not a terminal (a pipe, a log file, a batch job), :class:`Progress` prints
one line such as ``sample: 120/400 (30%) | 2.41 it/s | elapsed 0:50 | ETA 1:56`` at most every
``interval`` seconds (30 by default, ``CHUNKFORMER_PROGRESS_SECONDS`` overrides it) and once at
the end, so a silent job is never more than that long without a word.
"""

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

__all__ = ["Progress", "progress", "progress_interval"]

T = TypeVar("T")


def progress_interval() -> float:
    """Seconds between two progress lines off a terminal (``CHUNKFORMER_PROGRESS_SECONDS``, default 30)."""
    value = os.environ.get("CHUNKFORMER_PROGRESS_SECONDS", "30")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"CHUNKFORMER_PROGRESS_SECONDS must be a number of seconds, got {value!r}") from None
    if not seconds >= 0:
        raise ValueError(f"CHUNKFORMER_PROGRESS_SECONDS must be >= 0, got {value!r}")
    return seconds


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A count towards ``total``: a tqdm bar when ``file`` is a terminal, else timed lines.

    Args:
        total: items expected (``None``: unknown, no percentage or ETA).
        desc: what is counted, printed first on every line.
        unit: the item's name in the rate.
        interval: seconds between lines off a terminal (default :func:`progress_interval`).
        file: where to write (default ``sys.stderr``).
        bar: ``True`` / ``False`` forces the tqdm bar on / off (default: whether ``file`` is a TTY).
    """

    def __init__(self, total: int | None = None, *, desc: str = "", unit: str = "it", interval: float | None = None,
                 file: TextIO | None = None, bar: bool | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file if file is not None else sys.stderr
        self.interval = progress_interval() if interval is None else float(interval)
        self.n = 0
        self.start = self._last = time.monotonic()
        isatty = getattr(self.file, "isatty", lambda: False)()
        self._bar = None
        if bar if bar is not None else isatty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.file, dynamic_ncols=True)
        self.closed = False

    def line(self) -> str:
        """``desc: n/total (p%) | rate | elapsed | ETA``."""
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            text = f"{head}{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text = f"{head}{self.n} {self.unit}"
        text += f" | {rate:.3g} {self.unit}/s | elapsed {_clock(elapsed)}"
        if self.total and rate > 0:
            text += f" | ETA {_clock(max(self.total - self.n, 0) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(self.line(), file=self.file, flush=True)

    def close(self) -> None:
        """Finish the bar, or print the last line (once)."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            print(self.line(), file=self.file, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T], report: "bool | Progress" = True, *, total: int | None = None,
             desc: str = "", unit: str = "it") -> Iterator[T]:
    """Iterate ``iterable``, counting each item.

    ``report``: ``False`` counts nothing; ``True`` reports this loop alone (closed at its end); a
    :class:`Progress` adds this loop's items to that count (the caller closes it).
    """
    if report is False or report is None:
        yield from iterable
        return
    own = not isinstance(report, Progress)
    if own:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        report = Progress(total, desc=desc, unit=unit)
    try:
        for item in iterable:
            yield item
            report.update(1)
    finally:
        if own:
            report.close()
