"""Side-by-side benchmark of maclustr against direct, nginx, Caddy and LiteLLM (issue 6).

Why: a gateway exists to add nothing. Every figure here is taken in one run, rounds
interleaved across targets (direct, nginx, caddy, litellm, maclustr, direct, ...), and
reported as a ratio to direct from the same run, because this 2-core machine is noisy.
The headline is CPU per unit of work (the target's own CPU seconds from /proc divided by
requests or events served): it repeats within ~10% where throughput ratios move by ~0.1.

Placement (see Pinning): by default the load generator (wrk, this process's aiohttp client)
and the fake upstreams share the first CPU and the target process(es) get the second.

Scenarios: (a) unary chat via wrk, c=64 and c=16 (req/s, p50/p99) and c=1 (added latency);
(b) 64-chunk streams, unpaced, c=16 via wrk (streams/s, chunks/s); (c) 64-chunk streams
paced 20 ms, c=16 via aiohttp (TTFB p50/p99, added per-chunk latency vs direct); (d) N slow
streams at 1 chunk/s (RSS, CPU, all complete); (e) CPU microseconds per relayed event (from
b) and per unary request (from a); (f) the real tiny mlx_lm.server through maclustr vs direct;
(g) queueing (issue 7): 32 clients against an upstream that serves 2 streams at a time, maclustr
with max_concurrency 2 / max_queue 16 / queue_timeout 2 (completed, p50/p99, 429s with
Retry-After, longest wait vs queue_timeout), direct as the no-queue reference; (h) prompt-cache
affinity: two real tiny mlx_lm.server replicas behind one maclustr, TTFT of later conversation
turns with affinity vs round-robin, with the replicas' cached_tokens.

Run: `make bench` (full, < 8 min), `python bench/run.py --quick` (seconds),
`--only maclustr,direct`, `--scenarios a,b,e`, `--http11` (keep-alive upstream),
`--placement upstream-with-target`, `--profile` (py-spy of maclustr, not counted).
Every process started here is stopped by PID; every loop and wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

# `python bench/run.py` puts bench/ on the path, not the checkout: the parts are the package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ALL_TARGETS, EXTRA_TARGETS, PY, QUEUE_LIMITS, QUICK, RESULTS, WORK, Sizes
from bench.healing import scenario_w
from bench.load import med, parse_ms, pct, rotated, run_wrk, stream_load
from bench.procs import Pinning, mem_kb, settle, try_apt, version_of, wait_http
from bench.profiling import profile
from bench.replicas import scenario_g, scenario_h
from bench.report import build_tables, headline, verdicts
from bench.scenarios import ADDED_KEYS, RATIO_KEYS, SCENARIOS, scenario_f, scrape_metrics, slow_all
from bench.targets import (
    LITELLM_VENV,
    STARTERS,
    Target,
    Upstreams,
    sanity,
    start_litellm,
    start_maclustr,
    start_real_mlx,
    start_upstreams,
)

# the helpers tests/test_bench_helpers.py reads from this file
__all__ = ["headline", "main", "parse_ms", "pct", "verdicts"]

# ---------------------------------------------------------------- the run, part by part


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    p.add_argument("--only", default=",".join(ALL_TARGETS),
                   help=f"targets (default: %(default)s; also: {','.join(EXTRA_TARGETS)})")
    p.add_argument("--scenarios", default="a,b,c,d,e,f,i",
                   help="(default: %(default)s; also g, h: queueing and cache affinity; "
                        "t: issue 25's unary tail, 10 s at 1 and 16 connections; "
                        "w: issue 27's wedge-to-first-answer)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--slow-seconds", type=int, help="(d) duration (default 30, quick 3)")
    p.add_argument("--slow-streams", type=int, help="(d) streams (default 1000, quick 100)")
    p.add_argument("--slow-targets",
                   help="targets that run (d) (default: nginx,caddy,maclustr,maclustr-metrics; "
                        "quick: maclustr,maclustr-metrics)")
    p.add_argument("--slow-apart", action="store_true",
                   help="(d) one target after another instead of all at the same time")
    p.add_argument("--http11", action="store_true", help="keep-alive HTTP/1.1 fake upstream")
    p.add_argument("--compact-upstream", action="store_true",
                   help="the fake upstream writes compact JSON (separators , and :)")
    p.add_argument("--chunk-size", type=int, default=8,
                   help="content bytes per event of the unpaced fake (default: %(default)s)")
    p.add_argument("--placement", default="none",
                   choices=["split", "upstream-with-target", "none"],
                   help="CPU placement (default: %(default)s; see Pinning)")
    p.add_argument("--profile", action="store_true",
                   help="after the rounds, py-spy maclustr during (a) and (b) (not counted)")
    p.add_argument("--litellm-install-timeout", type=float, default=300.0)
    p.add_argument("--baseline", type=Path, action="append", default=[],
                   help="another checkout (e.g. a git worktree at an older commit), run with "
                        "this venv as target maclustr@<its commit> (added to --only); repeatable")
    p.add_argument("--out", default=str(RESULTS / "latest"), help="path prefix for .md/.json")
    args = p.parse_args(argv)
    args.baselines = []
    for tree in args.baseline:  # another checkout's code as one more target, same run
        name = f"maclustr@{version_of(['git', '-C', str(tree), 'rev-parse', '--short', 'HEAD'])}"
        STARTERS[name] = functools.partial(start_maclustr, tree=tree.resolve(), label=name)
        args.baselines.append(name)
    unknown = [n for n in target_names(args) if n not in STARTERS]
    if unknown:
        p.error(f"unknown targets {unknown}; known: {list(STARTERS)}")
    return args


def target_names(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    names += [n for n in args.baselines if n not in names]
    return names


def plan(args: argparse.Namespace) -> tuple[Sizes, list[str], set[str]]:
    """The sizes, the targets and the scenarios this run measures."""
    sizes = Sizes() if not args.quick else Sizes(**QUICK.__dict__)
    if args.rounds:
        sizes.rounds = args.rounds
    if args.slow_seconds:
        sizes.slow_s = args.slow_seconds
    if args.slow_streams:
        sizes.slow_streams = args.slow_streams
    names = target_names(args)
    scen = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if "e" in scen:
        scen |= {"a", "b"}  # (e) is computed from (a) and (b)
    if "direct" not in names and scen & {"a", "b", "c", "f", "i", "t"}:
        names.insert(0, "direct")  # ratios need the limit
    return sizes, names, scen


def new_report(args: argparse.Namespace, sizes: Sizes, pin: Pinning, names: list[str],
               scen: set[str]) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
        "placement": pin.describe(), "quick": args.quick, "sizes": sizes.__dict__,
        "upstream_mode": ("HTTP/1.1 keep-alive" if args.http11 else "HTTP/1.0 close-delimited")
        + f", {args.chunk_size}-byte content per chunk"
        + (", compact JSON" if args.compact_upstream else ", json.dumps default separators"),
        "targets": names, "scenarios": sorted(scen), "target_info": {}, "raw": {},
        "medians": {}, "ratios": {}, "rss": {}, "slow": {}, "real": {}, "queue": {},
        "cache_affinity": {}, "versions": {}, "metrics_scrape": {}}


def start_targets(targets: dict[str, Target], names: list[str], ups: Upstreams, pin: Pinning,
                  args: argparse.Namespace) -> None:
    """Start each target into `targets` (filled as they start: the caller stops them all)."""
    for n in names:
        print(f"  starting {n} ...", flush=True)
        try:
            if n == "litellm":
                t = start_litellm(ups, pin, args.http11, args.litellm_install_timeout)
            else:
                t = STARTERS[n](ups, pin, args.http11)
        except Exception as e:
            t = Target(n, error=f"start failed: {e!r}"[:300])
        targets[n] = t


def ready(targets: dict[str, Target], scen: set[str], pin: Pinning) -> None:
    """Wait for each target, check it answers right, warm it up; a failure marks it."""
    for t in targets.values():
        if t.error:
            continue
        try:
            for proc in t.procs:
                wait_http(t.urls["fast"] + t.health, proc, 90)
            asyncio.run(sanity(t))
            if scen & {"a", "t"}:  # warm-up: imports, pools, JIT-less caches
                run_wrk(t, "fast", False, 16, 1, pin)
        except Exception as e:
            tail = " ".join(p.tail(3) for p in t.procs)
            t.error = f"{e}"[:300] + (f" [log: {tail[:200]}]" if tail.strip() else "")
        print(f"  {t.name}: {'ready' if not t.error else 'NOT RUN: ' + t.error}",
              flush=True)


BRIEF_KEYS = ("c64_rps", "streams_s", "ttfb_p50_ms", "cpu_us_per_event",
              "batched_cpu_us_per_event", "c64_cpu_us_per_req", "chunk_lag_p50_ms",
              "c1_p999_ms", "c16_p999_ms", "c16_gc_longest_ms", "c16_loop_lag_ms")


def run_rounds(live: list[Target], scen: set[str], sizes: Sizes, pin: Pinning,
               report: dict[str, Any]) -> None:
    """(a), (b), (c), (i), (t), target after target, each round starting one later."""
    for rnd in range(sizes.rounds):
        for t in rotated(live, rnd):
            for s in ("a", "b", "c", "i", "t"):
                if s not in scen:
                    continue
                try:
                    settle(t.pids)
                    r = SCENARIOS[s](t, sizes, pin)
                except Exception as e:
                    r = {"error": repr(e)[:300]}
                report["raw"].setdefault(t.name, {}).setdefault(s, []).append(r)
                brief = {k: round(v, 2) for k, v in r.items() if k in BRIEF_KEYS}
                print(f"  round {rnd + 1} {t.name:>14} ({s}) {brief or r}", flush=True)


def medians(live: list[Target], report: dict[str, Any]) -> None:
    """Each figure's median over the rounds, and its ratio to (or excess over) direct."""
    for t in live:
        m: dict[str, float] = {}
        for s, runs in report["raw"].get(t.name, {}).items():
            keys = {k for r in runs for k, v in r.items() if isinstance(v, (int, float))}
            for k in keys:
                m[f"{s}.{k}"] = med([r.get(k, math.nan) for r in runs])
        report["medians"][t.name] = m
    d_med = report["medians"].get("direct", {})
    for name, m in report["medians"].items():
        rat = {f"{k}/direct": m[k] / d_med[k] for k in RATIO_KEYS
               if k in m and d_med.get(k) and not math.isnan(m[k])}
        rat.update({f"{k}-direct": m[k] - d_med[k] for k in ADDED_KEYS
                    if k in m and k in d_med})
        report["ratios"][name] = rat


def run_slow(live: list[Target], sizes: Sizes, args: argparse.Namespace,
             report: dict[str, Any]) -> None:
    """(d): N slow streams through each chosen target, together when descriptors allow."""
    slow_default = ("maclustr,maclustr-metrics" if args.quick
                    else "nginx,caddy,maclustr,maclustr-metrics")
    slow_names = [n.strip() for n in (args.slow_targets or slow_default).split(",")]
    slow_ts = [t for t in live if t.name in slow_names]
    # together, this process holds every target's streams open at once; where the
    # descriptor limit cannot hold them all, run them apart rather than fail them all
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    apart = (args.slow_apart
             or fd_limit < len(slow_ts) * sizes.slow_streams + 1024)
    print(f"  (d) {sizes.slow_streams} slow streams for {sizes.slow_s} s through "
          f"{', '.join(t.name for t in slow_ts)} "
          f"({'one after another' if apart else 'at the same time'}; "
          f"open-file limit {fd_limit}) ...",
          flush=True)
    for t in slow_ts:
        settle(t.pids)
    for t, res in zip(slow_ts, asyncio.run(slow_all(slow_ts, sizes,
                                                     not apart)),
                      strict=True):
        report["slow"][t.name] = (res if not isinstance(res, BaseException)
                                  else {"skipped": f"failed: {res!r}"[:200]})
        print(f"      {t.name}: {report['slow'][t.name]}", flush=True)


def run_real(live: list[Target], ups: Upstreams, sizes: Sizes, pin: Pinning,
             report: dict[str, Any]) -> None:
    """(f): the real tiny mlx_lm.server through maclustr and direct, rounds interleaved."""
    for t in live:
        if t.name not in ("direct", "maclustr", "maclustr-metrics", "maclustr-quiet"):
            continue
        if ups.real_error or "real" not in t.urls:
            report["real"][t.name] = {"skipped": ups.real_error or "no real upstream"}
            continue
        with contextlib.suppress(Exception):  # first request loads the weights
            asyncio.run(stream_load(t, "real", 1, 1, 1, max_tokens=8))
    real_runs: dict[str, list[dict[str, float]]] = {}
    real_ts = [t for t in live if "real" in t.urls]
    for rnd in range(sizes.rounds):
        for t in rotated(real_ts, rnd):
            if t.name in report["real"]:
                continue
            try:
                real_runs.setdefault(t.name, []).append(scenario_f(t, sizes, pin))
            except Exception as e:
                report["real"][t.name] = {"skipped": f"failed: {e!r}"[:200]}
    for name, rs in real_runs.items():
        if name in report["real"]:
            continue
        report["real"][name] = {k: med([r[k] for r in rs]) for k in rs[0]}
        report["real"][name]["requests"] = sum(r["requests"] for r in rs)
        report["real"][name]["complete"] = sum(r["complete"] for r in rs)
        report["raw"].setdefault(name, {})["f"] = rs


def run_queue(live: list[Target], sizes: Sizes, pin: Pinning, report: dict[str, Any]) -> None:
    """(g): admission control against an upstream that serves two at a time."""
    print(f"  (g) {sizes.queue_clients} clients for {sizes.queue_s:.0f} s against an "
          f"upstream serving {QUEUE_LIMITS['max_concurrency']} at a time ...",
          flush=True)
    for t in live:
        if t.name != "direct" and not t.name.startswith("maclustr"):
            continue
        settle(t.pids)
        try:
            report["queue"][t.name] = scenario_g(t, sizes, pin)
        except Exception as e:
            report["queue"][t.name] = {"skipped": f"failed: {e!r}"[:200]}
        print(f"      {t.name}: {report['queue'][t.name]}", flush=True)


def run_affinity(live: list[Target], sizes: Sizes, pin: Pinning,
                 report: dict[str, Any]) -> None:
    """(h): prompt-cache affinity with two real replicas."""
    if any(t.name.startswith("maclustr") for t in live):
        print(f"  (h) prompt-cache affinity: {sizes.affinity_convs} conversations x "
              f"{sizes.affinity_turns} turns, two real mlx_lm.server replicas ...",
              flush=True)
        try:
            report["cache_affinity"] = scenario_h(sizes, pin)
        except Exception as e:
            report["cache_affinity"] = {"skipped": f"failed: {e!r}"[:300]}
    else:
        report["cache_affinity"] = {"skipped": "maclustr not among the targets"}
    print(f"      {report['cache_affinity']}", flush=True)


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(), "kernel": platform.release(),
        "machine": platform.machine(),
        "wrk": version_of(["wrk", "-v"]), "nginx": version_of(["nginx", "-v"]),
        "caddy": version_of(["caddy", "version"]),
        "litellm": version_of([str(LITELLM_VENV / "bin" / "python"), "-c",
                               "import importlib.metadata as m; print(m.version('litellm'))"]),
        "maclustr": version_of([PY, "-c", "import maclustr; print(maclustr.__version__)"]),
        "aiohttp": version_of([PY, "-c", "import aiohttp; print(aiohttp.__version__)"]),
        "uvloop": version_of([PY, "-c", "import uvloop; print(uvloop.__version__)"]),
        "mlx_lm": version_of([PY, "-c",
                              "import importlib.metadata as m; print(m.version('mlx-lm'))"]),
    }


def write_report(report: dict[str, Any], sizes: Sizes, args: argparse.Namespace) -> None:
    """latest.md (the header, the headline, the tables) and latest.json (every figure)."""
    table = build_tables(report)
    header = (f"# maclustr benchmark ({'quick' if args.quick else 'full'} run)\n\n"
              f"{report['date']}, nproc {report['nproc']}, {report['placement']}; upstream "
              f"{report['upstream_mode']}; {sizes.rounds} interleaved round(s), medians; "
              f"ratios are × direct from this run; added = target − direct. "
              f"Elapsed {report['elapsed_s']} s.\n\n"
              "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
              + "\n\nTargets: " + "; ".join(
                  f"{n}: {i['note'] or ''}" for n, i in report["target_info"].items()) + "\n\n")
    md = header + headline(report) + table + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    print("\n" + md)
    print(f"written: {out.with_suffix('.md')}, {out.with_suffix('.json')}")


def measure(targets: dict[str, Target], ups: Upstreams, scen: set[str], sizes: Sizes,
            pin: Pinning, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Every scenario asked for, on the targets that started."""
    live = [t for t in targets.values() if not t.error]
    run_rounds(live, scen, sizes, pin, report)
    medians(live, report)
    if "d" in scen:
        run_slow(live, sizes, args, report)
    if "f" in scen:
        run_real(live, ups, sizes, pin, report)
    if "g" in scen:
        run_queue(live, sizes, pin, report)
    if "h" in scen:
        run_affinity(live, sizes, pin, report)
    if "w" in scen:
        print(f"  (w) {sizes.wedges} wedge(s) of a real tiny mlx_lm.server under a fake launchd "
              "...", flush=True)
        try:
            report["heal"] = scenario_w(sizes, pin)
        except Exception as e:
            report["heal"] = {"skipped": f"failed: {e!r}"[:300]}
    for t in live:
        if t.metrics:
            report["metrics_scrape"][t.name] = scrape_metrics(t)
    if args.profile:
        for t in live:
            if t.name.startswith("maclustr"):
                report.setdefault("profiles", {})[t.name] = profile(t, sizes, pin, scen)
    for t in live:
        report["rss"][t.name] = mem_kb(t.pids, "VmHWM") / 1024


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes, names, scen = plan(args)
    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    pin = Pinning(args.placement)
    os.sched_setaffinity(0, pin.load)  # this process is the aiohttp load generator
    print(f"bench: targets {names}, scenarios {sorted(scen)}, {sizes.rounds} round(s); "
          f"{pin.describe()}", flush=True)
    wrk_missing = try_apt("wrk", "wrk") if scen & {"a", "b", "t"} else None
    if wrk_missing:
        print(f"  scenarios a, b, t skipped: {wrk_missing}")
        scen -= {"a", "b", "e", "t"}

    ups = Upstreams()
    targets: dict[str, Target] = {}
    report = new_report(args, sizes, pin, names, scen)
    try:
        ups = start_upstreams(pin, sizes, args.http11, args.chunk_size, queue="g" in scen,
                              compact=args.compact_upstream)
        if "f" in scen:
            print("  starting the real tiny mlx_lm.server for (f) ...", flush=True)
            start_real_mlx(ups, pin)
        start_targets(targets, names, ups, pin, args)
        ready(targets, scen, pin)
        report["target_info"] = {n: {"error": t.error, "note": t.note, "pids": t.pids,
                                     "raw_framing": t.raw_framing}
                                 for n, t in targets.items()}
        measure(targets, ups, scen, sizes, pin, args, report)
    finally:
        for t in targets.values():
            for proc in t.procs:
                proc.stop()
        for proc in ups.procs:
            proc.stop()

    report["versions"] = versions()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    write_report(report, sizes, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
