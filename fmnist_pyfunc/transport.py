"""What one HTTP request to our servers may be, before any of it is parsed: the servers' limits, not the
model's (the model's input contract is `contract.py`). Used by the scoring server, its launcher and the UI."""

from __future__ import annotations

import json

import numpy as np
import orjson

# Request body of /invocations: two images at the per-image limit (base64: 4/3 larger), or a full batch
# of pixel rows written as floats (~10 KiB each), fit; anything larger is refused before it is read.
MAX_BODY_BYTES = 32 * 2**20
# Request bodies one worker holds at once, read or being read: four at the limit. Memory, not a count of
# requests, bounds how many wait: a burst of small requests all wait their turn; past this, 429.
MAX_HELD_BODY_BYTES = 4 * MAX_BODY_BYTES
# JSON nesting: our contract needs 4 levels (envelope, rows, 28 rows of 28); Python's parser recurses once per
# level and dies with RecursionError (a 500) near 1,000. Deeper than this is refused before parsing.
MAX_JSON_DEPTH = 32
# Each byte -> its step in nesting depth as an int8: [ and { +1, ] and } -1 (255), all others 0.
_STEPS = bytes(1 if chr(b) in "[{" else 255 if chr(b) in "]}" else 0 for b in range(256))


def json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text, vectorised (a byte translation and a cumulative sum: the
    largest allowed body costs milliseconds). Brackets inside strings count too: an over-estimate, harmless
    for base64 images (no brackets in their alphabet)."""
    steps = np.frombuffer(body.translate(_STEPS), np.int8)
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def loads(body: bytes):
    """JSON with orjson (~3x the standard library's speed); what orjson refuses is read again by the standard
    library, as MLflow's server does: it takes Python's NaN and Infinity, which `json.dumps` writes by
    default (the model then says which row holds them). ValueError for what neither reads."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
