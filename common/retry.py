"""Retrying storage calls: transient errors (timeouts, resets, 5xx, throttling) again with backoff, permanent
ones (missing object or bucket, access denied, bad input) at once.

Object stores fail some requests in normal operation; a run of days makes millions of them. s3fs and botocore
retry some errors themselves; this layer covers the rest (a connection reset mid-body, an endpoint that is
restarting) and gives up with one error naming the URL and what was tried.
"""

from __future__ import annotations

import errno
import http.client
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# permanent: retrying cannot help (a 404/403 from s3fs/gcsfs arrives as one of these)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_PERMANENT_ERRNO = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOSPC,
                    errno.EROFS, errno.EINVAL}
# the network stacks fsspec backends run on: their own exception types are transport errors
_NETWORK_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "google", "gcsfs", "s3fs",
                    "adlfs", "azure", "http")


class StorageError(OSError):
    """A storage call failed for good: permanently, or transiently `attempts` times in a row."""


def is_transient(e: BaseException) -> bool:
    """True for errors worth retrying: timeouts, connection resets and refusals, 5xx and throttling (which s3fs
    turns into plain OSError), and the network libraries' own errors; False for a missing object, access
    denied, a full disk, or anything that is not an I/O error (a bug, bad input)."""
    if isinstance(e, _PERMANENT):
        return False
    if isinstance(e, (TimeoutError, ConnectionError, http.client.HTTPException)):
        return True
    if isinstance(e, OSError):
        return e.errno not in _PERMANENT_ERRNO
    return type(e).__module__.split(".")[0] in _NETWORK_MODULES


def backoff(seconds: float) -> None:
    """The wait between two tries (one place: tests replace it to see whether a call was retried)."""
    time.sleep(seconds)


@dataclass
class RetryPolicy:
    attempts: int = 6  # tries in all, the first included
    backoff_s: float = 0.5  # first wait; doubled each time (full jitter), at most max_backoff_s
    max_backoff_s: float = 30.0

    def call(self, fn: Callable[[], T], what: str, on_retry: Optional[Callable[[BaseException], None]] = None) -> T:
        """`fn()`, retried on transient errors; `what` names the URL and operation in logs and the final error;
        `on_retry(e)` before each retry (the metrics count them)."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                if not is_transient(e):
                    if isinstance(e, OSError) and what not in str(e):  # name the URL, keep the type
                        try:
                            named = type(e)(e.errno, f"{what}: {e.strerror or e}")
                        except TypeError:
                            raise e from None
                        raise named from e
                    raise
                if attempt == self.attempts:
                    raise StorageError(errno.EIO, f"{what} failed {attempt} times, the last with "
                                                  f"{type(e).__name__}: {e}; the storage is unreachable or "
                                                  "failing: check the endpoint and network, then rerun "
                                                  "(finished work is kept)") from e
                delay = random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
                log.warning("%s: %s: %s (try %d of %d, again in %.1f s)", what, type(e).__name__, e, attempt,
                            self.attempts, delay)
                if on_retry is not None:
                    on_retry(e)
                backoff(delay)
        raise AssertionError("unreachable")
