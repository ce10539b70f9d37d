"""jsonfast gives the stdlib's values whether orjson is installed or not: decoding what the
stdlib decodes (same values), and re-encoding to JSON that decodes to the same values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maclustr import jsonfast

pytestmark = pytest.mark.usefixtures("json_backend")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(), st.text(), st.text(alphabet=st.characters(min_codepoint=0xD800,
                                                           max_codepoint=0xDFFF)))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                      max_leaves=16)


def canon(v: Any) -> str:
    """The stdlib's own text for a value: NaN == NaN, 1 != 1.0, order kept."""
    return json.dumps(v)


@settings(max_examples=300, deadline=None)
@given(v=values, ascii_only=st.booleans(), compact=st.booleans())
def test_loads_then_dumps_keeps_the_stdlib_values(v: Any, ascii_only: bool,
                                                  compact: bool) -> None:
    seps = (",", ":") if compact else (", ", ": ")
    raw = json.dumps(v, ensure_ascii=ascii_only, separators=seps).encode("utf-8",
                                                                         "surrogatepass")
    try:
        want = json.loads(raw)
    except ValueError:  # lone surrogates written raw are not UTF-8: both refuse
        with pytest.raises(ValueError):
            jsonfast.loads(raw)
        return
    got = jsonfast.loads(raw)
    assert canon(got) == canon(want)
    assert canon(json.loads(jsonfast.dumps(got))) == canon(want)


@pytest.mark.parametrize("raw", [
    b"123456789012345678901234567890", b"-98765432109876543210", b"18446744073709551616",
    b'{"seed": 99999999999999999999999}', b"NaN", b"-Infinity", b"[1e400, -1e400]",
    b'{"x": [NaN, Infinity]}', b'"\\ud800"', b'"\\udfff x"', b"1.5e-7", b"-0.0",
    '{"a": "é"}'.encode("utf-16"), b'{"a": 1, "a": 2}'])
def test_what_orjson_reads_differently_still_reads_as_the_stdlib_does(raw: bytes) -> None:
    want = json.loads(raw)
    got = jsonfast.loads(raw)
    assert canon(got) == canon(want)
    assert canon(json.loads(jsonfast.dumps(got))) == canon(want)


def test_non_finite_values_are_written_back_not_nulled() -> None:
    out = jsonfast.dumps(jsonfast.loads(b'{"l": [NaN, Infinity, -Infinity, 1e999]}'))
    assert b"null" not in out
    back = json.loads(out)["l"]
    assert math.isnan(back[0]) and back[1:] == [math.inf, -math.inf, math.inf]


@pytest.mark.parametrize("raw", [b"", b"{", b"{'a': 1}", b'{"a": 1,}', b"\xff\xfe\x00", b"[" * 5000,
                                 b"nan", b"01"])
def test_not_json_raises_value_error(raw: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)):
        json.loads(raw)
    with pytest.raises((ValueError, RecursionError)):
        jsonfast.loads(raw)


def test_str_input_reads_like_bytes() -> None:
    assert jsonfast.loads('{"a": [1, "é", 12345678901234567890123]}') == json.loads(
        '{"a": [1, "é", 12345678901234567890123]}')


def test_without_orjson_installed_the_stdlib_path_runs() -> None:
    """An install where orjson cannot be imported (PyPy): the module loads and works."""
    code = ("import sys; sys.modules['orjson'] = None\n"
            "from maclustr import jsonfast\n"
            "assert not jsonfast.available()\n"
            "assert not jsonfast.use_orjson(True) or True\n"
            "assert not jsonfast.available()\n"
            "assert jsonfast.loads(b'{\"a\": NaN}')['a'] != 0\n"
            "print(jsonfast.dumps({'a': [1, 'é']}).decode())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().strip() == '{"a": [1, "\\u00e9"]}'
