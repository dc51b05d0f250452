"""Per worker process, a budget of decoded pixels for all requests in progress: one request at the
request limit, with room left for light ones. A request that would go beyond waits for nobody: Busy,
which the servers answer with 429 and Retry-After."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from fmnist_pyfunc.contract import MAX_REQUEST_PIXELS

MAX_IN_FLIGHT_PIXELS = MAX_REQUEST_PIXELS + 8_000_000
_in_flight = {"pixels": 0}
_in_flight_lock = threading.Lock()


class Busy(RuntimeError):
    """This worker is decoding as much as it may at once; the caller should retry in a moment."""


@contextmanager
def admitted(pixels: int):
    """Reserve `pixels` of this process's decoding budget for the duration, or raise Busy."""
    with _in_flight_lock:
        if _in_flight["pixels"] and _in_flight["pixels"] + pixels > MAX_IN_FLIGHT_PIXELS:
            raise Busy(f"this server is decoding {_in_flight['pixels']:,} pixels already; retry in a moment")
        _in_flight["pixels"] += pixels
    try:
        yield
    finally:
        with _in_flight_lock:
            _in_flight["pixels"] -= pixels
