"""What one HTTP request to our servers may be, before any of it is parsed: the servers' limits, not the
model's (the model's input contract is `contract.py`). Used by the scoring server, its launcher and the UI."""

from __future__ import annotations

import numpy as np

# Request body of /invocations: two images at the per-image limit (base64: 4/3 larger), or a full batch
# of pixel rows written as floats (~10 KiB each), fit; anything larger is refused before it is read.
MAX_BODY_BYTES = 32 * 2**20
# JSON nesting: our contract needs 4 levels (envelope, rows, 28 rows of 28); Python's parser recurses once per
# level and dies with RecursionError (a 500) near 1,000. Deeper than this is refused before parsing.
MAX_JSON_DEPTH = 32
_OPENERS, _CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text, vectorised (one pass of numpy over the bytes: the
    largest allowed body costs milliseconds). Brackets inside strings count too: an over-estimate, harmless
    for base64 images (no brackets in their alphabet)."""
    raw = np.frombuffer(body, np.uint8)
    steps = np.isin(raw, _OPENERS).astype(np.int32) - np.isin(raw, _CLOSERS)
    return int(np.cumsum(steps).max(initial=0))
