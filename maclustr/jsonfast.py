"""JSON for the request and response paths: orjson when installed, the stdlib otherwise.

Why: decoding and re-encoding bodies is a fixed cost of every request (and of every event
that cannot take the SSE splice); orjson does it several times faster. Pure, no aiohttp.

Both paths give the same values. Where orjson would differ from the stdlib, the stdlib
decides: orjson refuses `NaN`/`Infinity`, lone surrogates, numbers beyond a double, and
other encodings than UTF-8 (the stdlib reads them: we fall back), reads integers longer than
64 bits as floats (any run of 19+ digits takes the stdlib), and would write a non-finite
float as `null` (values the stdlib read as non-finite are marked, so orjson refuses to write
them and the stdlib writes them as it always did). Output is compact UTF-8 with orjson and
`json.dumps` defaults (ASCII, `", "`) without it: the same JSON values either way.
"""

from __future__ import annotations

import importlib
import json
import math
from typing import Any


def _import_orjson() -> Any:
    """orjson, or None where it is not installed (typed Any either way, so type checks read
    the same with and without it)."""
    try:
        return importlib.import_module("orjson")
    except ImportError:  # the stdlib-path tests switch orjson off with `use_orjson`
        return None


_orjson: Any = _import_orjson()

_DIGITS = bytes.maketrans(b"0123456789", b"0" * 10)
_STR_DIGITS = str.maketrans("0123456789", "0" * 10)
_LONG_RUN = b"0" * 19  # 19+ digits may exceed orjson's 64-bit integers


class _NonFinite(float):
    """NaN or ±Infinity as the stdlib read it: orjson does not serialize float subclasses,
    so `dumps` hands such objects to the stdlib, which writes them back as it read them."""


def _constant(name: str) -> float:
    return _NonFinite(name)


def _number(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(value)


_fast = _orjson is not None


def use_orjson(on: bool) -> bool:
    """Switch orjson on or off (tests prove the stdlib path); returns the previous setting.
    Off when orjson is not installed, whatever is asked."""
    global _fast
    before = _fast
    _fast = on and _orjson is not None
    return before


def available() -> bool:
    """True when orjson is in use."""
    return _fast


def loads(data: bytes | str) -> Any:
    """Decode one JSON document. Raises ValueError (or RecursionError) when it is not JSON."""
    if _fast:
        if isinstance(data, str):
            long_int = "0" * 19 in data.translate(_STR_DIGITS)
        else:
            long_int = data.translate(_DIGITS).find(_LONG_RUN) >= 0
        if not long_int:
            try:
                return _orjson.loads(data)
            except _orjson.JSONDecodeError:
                pass  # what orjson refuses, the stdlib may read (NaN, other encodings)
        return json.loads(data, parse_constant=_constant, parse_float=_number)
    return json.loads(data)


def dumps(obj: Any) -> bytes:
    """Encode as JSON bytes. Raises TypeError/ValueError for what the stdlib cannot write."""
    if _fast:
        try:
            out: bytes = _orjson.dumps(obj)
            return out
        except TypeError:  # JSONEncodeError: big ints, surrogates, deep nesting, _NonFinite
            pass
    return json.dumps(obj).encode()
