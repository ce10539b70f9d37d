"""The usage ledger's rows and reports: what one request leaves behind, and the sums
`maclustr usage` and GET /v1/usage show. Pure: the SQLite file is usage_db.py's business.

A row is a plain tuple in COLUMNS order (cheap to build on the event loop and to hand to
sqlite's executemany). A report groups rows by some of key, model, day (UTC) and sums
requests and tokens; the same function serves the CLI and the endpoint, so they agree.
"""

from __future__ import annotations

import calendar
import csv
import io
import json
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .outcome import Outcome

# time: wall-clock seconds at the request's end; duration in seconds; error: its code or NULL.
COLUMNS = ("time", "key", "model", "endpoint", "status", "prompt_tokens",
           "completion_tokens", "cached_tokens", "duration", "error")
Row = tuple[float, str, str, str, int, int, int, int, float, "str | None"]
GROUPS = ("key", "model", "day")  # what --by may name, in this order by default
SUMS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
FORMATS = ("table", "json", "csv")
# A request refused before it started does not count against the requests-per-minute window.
NOT_ADMITTED = frozenset({"rate_limited", "quota_exceeded", "model_not_allowed"})


class ReportError(ValueError):
    """A --since or --by the report cannot use (the message says what is accepted)."""


def row_of(o: Outcome, now: float) -> Row:
    """The ledger row of a finished model request."""
    return (now, o.key, o.model, o.endpoint, o.status, o.prompt_tokens or 0,
            o.completion_tokens or 0, o.cached_tokens or 0, round(o.duration, 6), o.error)


def parse_since(text: str | None, now: float) -> float:
    """`--since`: YYYY-MM-DD (UTC midnight) or Nd (N days back from now); None: everything."""
    if not text:
        return 0.0
    m = re.fullmatch(r"(\d{1,5})d", text.strip())
    if m:
        return now - int(m.group(1)) * 86400.0
    try:
        return float(calendar.timegm(time.strptime(text.strip(), "%Y-%m-%d")))
    except ValueError:
        raise ReportError(f"--since must be YYYY-MM-DD or a number of days like 7d, got "
                          f"'{text[:40]}'") from None


def parse_by(text: str | None) -> tuple[str, ...]:
    """`--by`: a comma list of key, model, day (default all three), in the order given."""
    if text is None:
        return GROUPS
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in GROUPS]
    if bad or not parts or len(set(parts)) != len(parts):
        raise ReportError(f"--by takes a comma list of {', '.join(GROUPS)}, got '{text[:40]}'")
    return parts


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def aggregate(rows: Iterable[Sequence[Any]], by: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of (UTC day number, key, model, requests, prompt_tokens, completion_tokens),
    summed per `by` group and sorted by the group's fields."""
    sums: dict[tuple[str, ...], list[int]] = {}
    want = tuple(by)
    for day, key, model, n, p, c in rows:
        named = {"key": key, "model": model, "day": "" if "day" not in want
                 else day_of(day * 86400.0)}
        group = tuple(named[g] for g in want)
        s = sums.get(group)
        if s is None:
            s = sums[group] = [0, 0, 0]
        s[0] += n
        s[1] += p
        s[2] += c
    return [{**dict(zip(want, group, strict=True)), "requests": n, "prompt_tokens": p,
             "completion_tokens": c, "total_tokens": p + c}
            for group, (n, p, c) in sorted(sums.items())]


def render(report: list[dict[str, Any]], by: Sequence[str], fmt: str) -> str:
    """The report as `maclustr usage` prints it: table, json (a list of objects) or csv."""
    fields = [*by, *SUMS]
    if fmt == "json":
        return json.dumps(report, indent=1)
    if fmt == "csv":
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(report)
        return out.getvalue().rstrip("\n")
    cells = [[f.upper() for f in fields]] + [[str(r[f]) for f in fields] for r in report]
    widths = [max(len(row[i]) for row in cells) for i in range(len(fields))]
    numeric = [False] * len(by) + [True] * len(SUMS)
    return "\n".join("  ".join(c.rjust(w) if num else c.ljust(w)
                               for c, w, num in zip(row, widths, numeric, strict=True)).rstrip()
                     for row in cells)
