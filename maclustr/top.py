"""`maclustr top`: scrape a running gateway's /metrics and print each window's figures per
model (stats.py does the arithmetic); on a terminal the table is redrawn in place."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .auth import KeyConfigError, parse_keys


def run_top(args: argparse.Namespace) -> int:
    """Scrape /metrics every `interval` seconds and print each window's figures per model;
    on a terminal the table is redrawn in place."""
    import urllib.error
    import urllib.request

    from .stats import Snapshot, format_table, window

    key = args.key
    if key is None:
        try:
            keys = parse_keys(os.environ.get("MACLUSTR_API_KEY"))
        except KeyConfigError:
            keys = ()
        key = keys[0][1] if keys else None
    url = args.url.rstrip("/") + "/metrics"
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def scrape() -> Snapshot:
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return Snapshot.from_text(r.read().decode(), time.monotonic())

    frames = 1 if args.once else args.iterations
    interval = max(args.interval, 0.1)
    tty = sys.stdout.isatty()
    try:
        prev = scrape()
        shown = 0
        while not frames or shown < frames:
            time.sleep(interval)
            cur = scrape()
            table = format_table(window(prev, cur), cur.at - prev.at)
            print(("\x1b[H\x1b[2J" if tty else "") + f"maclustr top  {args.url}\n{table}",
                  flush=True)
            prev = cur
            shown += 1
    except urllib.error.HTTPError as e:
        hint = " (pass --key, or set MACLUSTR_API_KEY)" if e.code == 401 else ""
        print(f"maclustr top: {url} answered {e.code}{hint}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"maclustr top: cannot read {url}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
