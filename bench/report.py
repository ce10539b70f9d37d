"""The report: issue 15's verdicts, the headline, the tables (latest.md)."""

from __future__ import annotations

import math
from typing import Any

from bench.common import BURST_STREAMS, QUEUE_LIMITS, QUEUE_MARGIN_S, TRICKLE_MS


def fmt(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def ratio(v: float, d: float) -> str:
    if math.isnan(v) or math.isnan(d) or not d:
        return ""
    return f" ({v / d:.2f}×)"


def skipped_row(name: str, reason: str, columns: int) -> str:
    """A target that was not measured keeps its row: name, reason, the other cells blank."""
    return f"| {name} | {reason} |" + " |" * (columns - 2) + "\n"


RSS_LIMIT_MB = 150.0
TOKENS_FLOOR = 0.97
BURST_TTFB_LIMIT_MS = 1.0


def verdicts(report: dict[str, Any], name: str) -> list[tuple[str, str, bool | None]]:
    """Issue 15's targets for one maclustr target, from this run's figures only:
    (what, the figures, met? — None when not measured in this run)."""
    m = report["medians"].get(name, {})
    c = report["medians"].get("caddy", {})
    d = report["medians"].get("direct", {})

    def get(src: dict[str, float], k: str) -> float:
        return float(src.get(k, math.nan))

    def below(v: float, ref: float) -> bool | None:
        return None if math.isnan(v) or math.isnan(ref) else v < ref

    out: list[tuple[str, str, bool | None]] = []
    for key, what in (("b.cpu_us_per_event", "CPU per relayed event (per-event reads)"),
                      ("a.c64_cpu_us_per_req", "CPU per unary request")):
        v, ref = get(m, key), get(c, key)
        out.append((f"{what} below Caddy's", f"{fmt(v, 1)} vs {fmt(ref, 1)} µs"
                    f"{ratio(v, ref)}", below(v, ref)))
    added = get(m, "i.ttfb_p50_ms") - get(d, "i.ttfb_p50_ms")
    out.append((f"added TTFB p50, {BURST_STREAMS}-stream burst ≤ {BURST_TTFB_LIMIT_MS:g} ms",
                f"{fmt(added, 2)} ms", None if math.isnan(added)
                else added <= BURST_TTFB_LIMIT_MS))
    lag = get(m, "c.chunk_lag_p50_ms") - get(d, "c.chunk_lag_p50_ms")
    lag_c = get(c, "c.chunk_lag_p50_ms") - get(d, "c.chunk_lag_p50_ms")
    out.append(("added per-chunk latency p50 ≤ Caddy's", f"{fmt(lag, 3)} vs {fmt(lag_c, 3)} ms",
                None if math.isnan(lag) or math.isnan(lag_c) else lag <= lag_c))
    real, rd = report.get("real", {}).get(name, {}), report.get("real", {}).get("direct", {})
    tps = float(real.get("tokens_s", math.nan)) / float(rd.get("tokens_s", math.nan) or math.nan)
    out.append((f"real tiny mlx_lm.server tokens/s ≥ {TOKENS_FLOOR}× direct", f"{fmt(tps, 3)}×",
                None if math.isnan(tps) else tps >= TOKENS_FLOOR))
    slow = report.get("slow", {}).get(name, {})
    if "complete" in slow:
        ok: bool | None = (slow["complete"] == slow["streams"]
                           and slow["rss_peak_mb"] <= RSS_LIMIT_MB)
        if ok and slow["streams"] < 1000:
            ok = None  # a smaller run (--quick) proves nothing about 1,000
        out.append((f"1,000 slow streams complete, peak RSS ≤ {RSS_LIMIT_MB:g} MB",
                    f"{slow['complete']}/{slow['streams']}, {fmt(slow['rss_peak_mb'], 0)} MB",
                    ok))
    else:
        out.append((f"1,000 slow streams complete, peak RSS ≤ {RSS_LIMIT_MB:g} MB",
                    "not measured", None))
    return out


def headline(report: dict[str, Any]) -> str:
    """The faithful-regime summary: CPU per unit of work beside Caddy and direct, the burst,
    per-chunk latency; batched-read CPU as a secondary row; issue 15's targets checked."""
    med_ = report["medians"]
    if not med_:
        return ""
    d, c = med_.get("direct", {}), med_.get("caddy", {})
    lines = ["Faithful regime: HTTP/1.0 upstream (one request per connection), `data: ` + "
             "json.dumps(obj) per event, one write per event"
             f" ({TRICKLE_MS:g} ms apart in (b): each event its own read), "
             f"{report['placement']}.\n",
             "| target | CPU µs / unary request (× Caddy) | CPU µs / relayed event (× Caddy) "
             f"| burst of {BURST_STREAMS}: TTFB p50 / p99 ms (added p50 / p99) "
             "| paced: added per-chunk p50 ms |", "|---|---|---|---|---|"]
    for name in report["targets"]:
        if report["target_info"].get(name, {}).get("error") or name not in med_:
            continue
        m = med_[name]

        def g(k: str, src: dict[str, float] = m) -> float:
            return float(src.get(k, math.nan))

        direct = name == "direct"
        lag = ("(" + fmt(g("c.chunk_lag_p50_ms"), 3) + " direct)" if direct
               else fmt(g("c.chunk_lag_p50_ms") - g("c.chunk_lag_p50_ms", d), 3))
        lines.append(
            f"| {name} | {'' if direct else fmt(g('a.c64_cpu_us_per_req'), 0)}"
            f"{'' if direct else ratio(g('a.c64_cpu_us_per_req'), g('a.c64_cpu_us_per_req', c))}"
            f" | {'' if direct else fmt(g('b.cpu_us_per_event'), 1)}"
            f"{'' if direct else ratio(g('b.cpu_us_per_event'), g('b.cpu_us_per_event', c))}"
            f" | {fmt(g('i.ttfb_p50_ms'), 2)} / {fmt(g('i.ttfb_p99_ms'), 2)}"
            + ("" if direct else f" (+{fmt(g('i.ttfb_p50_ms') - g('i.ttfb_p50_ms', d), 2)} / "
                                 f"+{fmt(g('i.ttfb_p99_ms') - g('i.ttfb_p99_ms', d), 2)})")
            + f" | {lag} |")
    row = ["Secondary (batched reads: the unpaced upstream, whose events coalesce into large "
           "reads), CPU µs / relayed event: "]
    row.append(", ".join(
        f"{n} {fmt(float(med_[n].get('b.batched_cpu_us_per_event', math.nan)), 1)}"
        for n in report["targets"] if n in med_ and n != "direct"))
    out = "\n".join(lines) + "\n\n" + "".join(row) + "\n"
    for name in report["targets"]:
        if not name.startswith("maclustr") or name not in med_:
            continue
        out += f"\nIssue 15 targets, {name} (this run):\n\n"
        for what, figures, ok in verdicts(report, name):
            mark = "not measured" if ok is None else "met" if ok else "NOT met"
            out += f"- {what}: {figures} — {mark}\n"
    return out + "\n"


def build_tables(report: dict[str, Any]) -> str:
    med_ = report["medians"]
    d = med_.get("direct", {})
    lines = ["| target | unary req/s c=64 | unary req/s c=16 | unary p50/p99 ms c=64 "
             "| seq c=1 added ms | stream req/s c=16 | chunks/s | paced TTFB p50/p99 ms "
             "(added p50) | paced added per-chunk p50 ms | CPU µs / unary req | "
             "CPU µs / relayed event (per-event reads) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in report["targets"]:
        info = report["target_info"][name]
        if info.get("error"):
            lines.append(f"| {name} | not run: {info['error']} |" + " |" * 10)
            continue
        m = med_.get(name, {})

        def g(k: str, m: dict[str, float] = m) -> float:
            return float(m.get(k, math.nan))

        def dg(k: str) -> float:
            return float(d.get(k, math.nan))

        added_seq = g("a.c1_p50_ms") - dg("a.c1_p50_ms")
        added_ttfb = g("c.ttfb_p50_ms") - dg("c.ttfb_p50_ms")
        added_chunk = g("c.chunk_lag_p50_ms") - dg("c.chunk_lag_p50_ms")
        is_direct = name == "direct"
        direct_lag = "(" + fmt(g("c.chunk_lag_p50_ms"), 2) + ")"
        lines.append(
            f"| {name} | {fmt(g('a.c64_rps'), 0)}{ratio(g('a.c64_rps'), dg('a.c64_rps'))} "
            f"| {fmt(g('a.c16_rps'), 0)}{ratio(g('a.c16_rps'), dg('a.c16_rps'))} "
            f"| {fmt(g('a.c64_p50_ms'), 2)} / {fmt(g('a.c64_p99_ms'), 2)} "
            f"| {'(' + fmt(g('a.c1_p50_ms'), 3) + ')' if is_direct else fmt(added_seq, 3)} "
            f"| {fmt(g('b.streams_s'), 0)}{ratio(g('b.streams_s'), dg('b.streams_s'))} "
            f"| {fmt(g('b.chunks_s'), 0)} "
            f"| {fmt(g('c.ttfb_p50_ms'), 2)} / {fmt(g('c.ttfb_p99_ms'), 2)}"
            f"{'' if is_direct else ' (+' + fmt(added_ttfb, 2) + ')'} "
            f"| {direct_lag if is_direct else fmt(added_chunk, 2)} "
            f"| {'' if is_direct else fmt(g('a.c64_cpu_us_per_req'), 0)} "
            f"| {'' if is_direct else fmt(g('b.cpu_us_per_event'), 1)} "
            f"| {'' if is_direct else fmt(report['rss'].get(name, math.nan), 0)} |")
    out = "\n".join(lines) if set(report["scenarios"]) & {"a", "b", "c"} else ""
    notes = []
    for name, by_s in report["raw"].items():
        for s, runs in by_s.items():
            for i, r in enumerate(runs):
                bad = {k: r[k] for k in ("c64_non2xx", "c16_non2xx", "c64_timeouts",
                                         "c16_timeouts", "c16_connect_err", "errors",
                                         "error", "first_error")
                       if r.get(k)}
                if not report["target_info"].get(name, {}).get("raw_framing"):
                    bad.update({k: r[k] for k in ("c64_read_err", "c16_read_err") if r.get(k)})
                if bad:
                    notes.append(f"- {name} ({s}) round {i + 1}: {bad}")
    if notes:
        out += "\n\nAnomalies (non-2xx, socket errors, incomplete streams):\n" + "\n".join(notes)
    if report.get("slow"):
        out += ("\n\n(d) slow streams: N concurrent streams, 1 chunk/s\n\n"
                "| target | complete | wall s | target CPU s | RSS before → peak MB | VmHWM MB "
                "| errors |\n|---|---|---|---|---|---|---|\n")
        for name, r in report["slow"].items():
            if "skipped" in r:
                out += skipped_row(name, r["skipped"], 7)
                continue
            out += (f"| {name} | {r['complete']}/{r['streams']} | {fmt(r['wall_s'])} "
                    f"| {fmt(r['cpu_s'], 2)} | {fmt(r['rss_before_mb'])} → "
                    f"{fmt(r['rss_peak_mb'])} | {fmt(r['hwm_mb'])} "
                    f"| {'; '.join(r['errors'])} |\n")
    if report.get("real"):
        out += ("\n(f) real tiny mlx_lm.server, streamed (tokens/s end to end = tokens / time "
                "from send to last token; decode = first to last token)\n\n| target | TTFB ms "
                "| tokens/s | decode tokens/s | events | complete |\n|---|---|---|---|---|---|\n")
        rd = report["real"].get("direct", {})
        for name, r in report["real"].items():
            if "skipped" in r:
                out += skipped_row(name, r["skipped"], 6)
                continue
            out += (f"| {name} | {fmt(r['ttfb_ms'], 2)} | {fmt(r['tokens_s'], 0)}"
                    f"{ratio(r['tokens_s'], rd.get('tokens_s', math.nan))} "
                    f"| {fmt(r['decode_tokens_s'], 0)} | {fmt(r['events'], 0)} "
                    f"| {fmt(r['complete'], 0)}/"
                    f"{fmt(r['requests'], 0)} |\n")
    out += queue_tables(report) + tail_table(report) + heal_table(report)
    return out.lstrip("\n")


def heal_table(report: dict[str, Any]) -> str:
    """(w): wedge to the first answer the restarted replica served (issue 27)."""
    h = report.get("heal")
    if not h:
        return ""
    if "skipped" in h:
        return f"\n\n(w) wedge to first answer: {h['skipped']}\n"
    out = ("\n\n(w) wedge to first answer (issue 27): a real tiny mlx_lm.server under a fake "
           "launchd, its generation thread killed by a DIE prompt; `restart:` is the job's "
           "`launchctl kickstart -k`; a client asks every 50 ms; one-shot: the DIE request's "
           "client leaves after 0.5 s, poison: it waits\n\n"
           "| wedge | seconds to the first 200 | the DIE request got | answers before the "
           "first 200 | restarts (s each) | gateway CPU s |\n|---|---|---|---|---|---|\n")
    for i, r in enumerate(h["runs"], 1):
        out += (f"| {i} {r.get('kind', '')} | {fmt(r['recovery_s'], 2)}"
                f"{' (' + r['error'] + ')' if r.get('error') else ''} | {r['wedge_status']} "
                f"| {r['before_first_200'] or 'none'} "
                f"| {', '.join(fmt(x, 1) for x in r.get('restarts_s', [])) or 'none'} "
                f"| {fmt(r['gateway_cpu_s'], 2)} |\n")
    return out + f"\nRestarts the gateway ran (kickstarts): {h['kickstarts']}\n"


TAIL_LIMIT = 3.0  # issue 25: unary p99.9 through maclustr within 3x Caddy's, same run


def tail_table(report: dict[str, Any]) -> str:
    """(t): unary tail latency at 1 and 16 keep-alive connections, the pauses maclustr saw
    in the same windows, and issue 25's p99.9 target against Caddy."""
    med_ = report["medians"]
    have = [n for n in report["targets"] if "t.c1_p999_ms" in med_.get(n, {})]
    if not have:
        return ""
    secs = report["sizes"].get("tail_s", "?")
    out = (f"\n\n(t) unary tail: wrk {secs} s per run, keep-alive, the unpaced fake (ms; "
           "the longest collector pause and loop lag are maclustr's own, from MACLUSTR_PAUSES)"
           "\n\n| target | c=1 mean / p99 / p99.9 / max | c=16 mean / p99 / p99.9 / max "
           "| longest gc pause c=1 / c=16 (collections) | longest loop lag c=1 / c=16 |\n"
           "|---|---|---|---|---|\n")
    for name in have:
        m = med_[name]

        def g(k: str, m: dict[str, float] = m) -> float:
            return float(m.get(f"t.{k}", math.nan))

        lat = [" / ".join(fmt(g(f"c{c}_{k}"), 2) for k in ("mean_ms", "p99_ms", "p999_ms",
                                                           "max_ms")) for c in (1, 16)]
        gc_ = " / ".join(f"{fmt(g(f'c{c}_gc_longest_ms'), 2)} ({fmt(g(f'c{c}_gc_collections'), 0)})"
                         for c in (1, 16))
        lag = " / ".join(fmt(g(f"c{c}_loop_lag_ms"), 1) for c in (1, 16))
        out += f"| {name} | {lat[0]} | {lat[1]} | {gc_} | {lag} |\n"
    caddy = med_.get("caddy", {})
    for name in have:
        if not name.startswith("maclustr"):
            continue
        for c in (1, 16):
            v = float(med_[name].get(f"t.c{c}_p999_ms", math.nan))
            ref = float(caddy.get(f"t.c{c}_p999_ms", math.nan))
            ok = None if math.isnan(v) or math.isnan(ref) else v <= TAIL_LIMIT * ref
            mark = "not measured" if ok is None else "met" if ok else "NOT met"
            out += (f"\n- {name}, c={c}: unary p99.9 within {TAIL_LIMIT:g}× Caddy's: "
                    f"{fmt(v, 2)} vs {fmt(ref, 2)} ms{ratio(v, ref)} — {mark}")
    return out + "\n"


def queue_tables(report: dict[str, Any]) -> str:
    """The (g) and (h) tables (issue 7): admission control and prompt-cache affinity."""
    out = ""
    if report.get("queue"):
        lim = QUEUE_LIMITS
        out += ("\n\n(g) queueing: an upstream that serves "
                f"{lim['max_concurrency']} streams at a time (20 events × 20 ms, ~0.4 s "
                "each; it holds the rest), clients sending back to back, honouring "
                "Retry-After on 429; maclustr's route: "
                + ", ".join(f"`{k}: {v}`" for k, v in lim.items())
                + f". Wait = time to the response head; over = waits longer than "
                f"queue_timeout + {QUEUE_MARGIN_S} s.\n\n"
                "| target | clients × s | completed (/s) | latency p50 / p99 ms | TTFB p50 ms "
                "| 429 (with Retry-After) | 429 queue full / queue timeout | max wait s "
                "(ok / 429) | over | errors |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for name, r in report["queue"].items():
            if "skipped" in r:
                out += skipped_row(name, r["skipped"], 10)
                continue
            direct = name == "direct"
            ra = f", Retry-After {r['retry_after_values']}" if r["retry_after_values"] else ""
            of = " of " + fmt(r["requests"], 0)
            err = " " + r["first_error"] if r["first_error"] else ""
            out += (f"| {name}{' (no queue: the upstream holds)' if direct else ''} "
                    f"| {fmt(r['clients'], 0)} × {fmt(r['seconds'], 0)} "
                    f"| {fmt(r['completed'], 0)} ({fmt(r['completed_per_s'], 1)}) "
                    f"| {fmt(r['p50_ms'], 0)} / {fmt(r['p99_ms'], 0)} "
                    f"| {fmt(r['ttfb_p50_ms'], 0)} "
                    f"| {fmt(r['rejected_429'], 0)} ({fmt(r['rejected_429_with_retry_after'], 0)}"
                    f"{ra}"
                    f") | {fmt(r['rejected_queue_full'], 0)} / "
                    f"{fmt(r['rejected_queue_timeout'], 0)} "
                    f"| {fmt(r['max_wait_s'], 2)} ({fmt(r['max_wait_ok_s'], 2)} / "
                    f"{fmt(r['max_wait_429_s'], 2)}) "
                    f"| {fmt(r['waits_over_timeout'], 0)}{of} "
                    f"| {fmt(r['errors'], 0)}{err} |\n")
    a = report.get("cache_affinity")
    if a:
        if "skipped" in a:
            return out + f"\n\n(h) prompt-cache affinity: {a['skipped']}\n"
        out += ("\n\n(h) prompt-cache affinity, real tiny mlx_lm.server: two replicas of one "
                f"model (independent prompt caches) behind one maclustr; "
                f"{a['conversations']} conversations × {a['turns']} turns, interleaved turn "
                "by turn, each a ~1,300-token system prompt plus ~100 tokens per turn, "
                "streamed, max_tokens 4. affinity = one alias listing both replicas "
                "(the default routing); round-robin = two one-replica aliases, each "
                "conversation alternating between them turn by turn; one replica = every "
                "request to the same replica (reference: one cache, all conversations). "
                "Cached = `usage.prompt_tokens_details.cached_tokens` of turns 2+.\n\n"
                "| routing | TTFT turns 2+ p50 (mean) ms | TTFT turn 1 p50 ms "
                "| TTFT per turn ms (median over conversations) "
                "| cached / prompt tokens, turns 2+ |\n|---|---|---|---|---|\n")
        for mode in ("affinity", "round-robin", "one replica"):
            r = a.get(mode)
            if not r:
                continue
            out += (f"| {mode} | {fmt(r['ttft_later_p50_ms'], 1)} "
                    f"({fmt(r['ttft_later_mean_ms'], 1)}) "
                    f"| {fmt(r['ttft_first_p50_ms'], 1)} "
                    f"| {' / '.join(fmt(x, 0) for x in r['ttft_by_turn_ms'])} "
                    f"| {fmt(r['later_cached_tokens'], 0)} / {fmt(r['later_prompt_tokens'], 0)}"
                    f" ({fmt(100 * r['later_cached_share'], 0)} %) |\n")
        out += (f"\nround-robin / affinity, TTFT of turns 2+: "
                f"{fmt(a['rr_over_affinity'], 2)}×\n")
    return out
