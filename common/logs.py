"""Logging: every module logs through `logging`; this sets up where it goes.

Console: INFO lines to stdout as plain text (what a person reads), warnings and errors to stderr prefixed
`warning:` / `error:`; on ranks other than 0 only warnings and errors (8 ranks do not print 8 copies). The
console stream is looked up at each line, so redirected or captured output gets it. A log file (the run
folder's `train.log`, a shard set's `shards.log`) gets every line with a timestamp, level, rank and module.

Progress: `Progress` is a tqdm bar on a terminal, and otherwise one plain line every `interval` seconds
(done/total, rate, ETA), never carriage-return updates that make a multi-megabyte single line in a log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

FILE_FORMAT = "%(asctime)s %(levelname)s rank%(rank)s %(name)s: %(message)s"


class _Console(logging.Handler):
    def __init__(self, rank: int):
        super().__init__(logging.DEBUG)
        self.rank = rank

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and self.rank != 0:
            return
        try:
            msg = record.getMessage()
            if record.levelno >= logging.WARNING:
                print(f"{'error' if record.levelno >= logging.ERROR else 'warning'}: {msg}", file=sys.stderr,
                      flush=True)
            else:
                print(msg, file=sys.stdout, flush=True)
        except Exception:  # logging must never end the run
            self.handleError(record)


class _Rank(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def console(rank: int = 0, level: int = logging.INFO) -> None:
    """Send the project's log lines to the console (idempotent; the latest `rank` wins)."""
    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h, _Console):
            h.rank = rank
            break
    else:
        root.addHandler(_Console(rank))
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    for noisy in ("fsspec", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def to_file(path: Optional[os.PathLike], rank: int = 0, level: int = logging.INFO) -> Iterator[None]:
    """Also append the log lines of `level` and above to `path` (a local file, created with its folder at the first
    line) while the block runs."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, delay=True)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.addFilter(_Rank(rank))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def duration(seconds: float) -> str:
    """3h04m, 12m05s, 42s."""
    s = int(round(max(0.0, seconds)))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """A progress bar on a terminal; one log line every `interval` seconds otherwise (and a last one at close)."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, interval: float = 10.0,
                 logger: Optional[logging.Logger] = None):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.log = logger or logging.getLogger(__name__)
        self.done, self.note = 0, ""
        self.t0 = self.last = time.monotonic()
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, smoothing=0.05)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self.note = note or self.note
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
        elif self.enabled and time.monotonic() - self.last >= self.interval:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        self.log.info(f"{self.desc}: {self.done}/{self.total} {self.unit}s ({self.done / max(self.total, 1):.0%}), "
                      f"{rate:.2f} {self.unit}s/s{eta}" + (f", {self.note}" if self.note else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done:
            self._line()
