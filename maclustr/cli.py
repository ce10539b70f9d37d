"""Command line: `maclustr serve` runs the gateway, `maclustr check` validates a routes file,
`maclustr plists` / `maclustr hostfile` render what a node runs.

Every command returns an exit code; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import __version__
from .auth import KeyConfigError, KeyRing, parse_keys
from .config import ConfigError, RouteTable, load_routes
from .logs import configure_logging
from .policy import DEFAULT
from .top import run_top

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("maclustr")
LOG_LEVELS = ("debug", "info", "warning", "error")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then run the one command it names."""
    args = parser().parse_args(argv)
    return COMMANDS[args.command](args)


def parser() -> argparse.ArgumentParser:
    """`maclustr` and its commands, each added by its own function below."""
    p = argparse.ArgumentParser(prog="maclustr", description=__doc__)
    p.add_argument("--version", action="version", version=f"maclustr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_serve_command, _check_command, _plists_command, _hostfile_command,
                _top_command, _usage_command):
        add(sub)
    return p


def _serve_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`maclustr serve`: run the gateway."""
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--routes", default="routes.yaml", help="routes file (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: %(default)s; 0.0.0.0 exposes it to the "
                            "network, so it must be asked for explicitly)")
    serve.add_argument("--port", type=int, default=9000, help="port (default: %(default)s)")
    serve.add_argument("--log-level", default=os.environ.get("MACLUSTR_LOG_LEVEL", "info"),
                       choices=LOG_LEVELS)
    serve.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="text (default) or json: one JSON object per line, the access "
                            "log's with time, request id, key name, model, status, timings, "
                            "tokens (for jq and log shippers)")
    serve.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                       help="event loop: uvloop when installed (auto, the default; a run-time "
                            "dependency wherever it has wheels), or the standard asyncio loop")
    serve.add_argument("--reload-interval", type=float, default=1.0,
                       help="seconds between checks of the routes file (0 disables polling; "
                            "SIGHUP always reloads)")


def _check_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`maclustr check`: validate a routes file."""
    check = sub.add_parser("check", help="validate a routes file and print its alias table")
    check.add_argument("--routes", default="routes.yaml", help="routes file (default: %(default)s)")


def _plists_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`maclustr plists`: one node's launchd plists."""
    plists = sub.add_parser("plists", help="render the launchd plists of one node")
    plists.add_argument("--node", required=True, help="node name from routes.yaml's nodes:")
    plists.add_argument("--out", required=True, help="directory to write <label>.plist into")
    plists.add_argument("--routes", default="routes.yaml",
                        help="routes file (default: %(default)s)")


def _hostfile_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`maclustr hostfile`: a sharded model's MLX hostfile."""
    hostfile = sub.add_parser("hostfile", help="print the MLX hostfile (JSON) of a sharded model")
    hostfile.add_argument("--model", required=True, help="alias of a model with shards:")
    hostfile.add_argument("--routes", default="routes.yaml",
                          help="routes file (default: %(default)s)")


def _top_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`maclustr top`: live figures from a gateway's /metrics."""
    top = sub.add_parser("top", help="per-model requests/min, time to first token, tokens/s, "
                         "in flight, queued and errors from a gateway's /metrics, refreshed "
                         "in place")
    top.add_argument("--url", default="http://127.0.0.1:9000",
                     help="the gateway's base URL (default: %(default)s)")
    top.add_argument("--key", default=None,
                     help="API key for /metrics (default: the first of MACLUSTR_API_KEY; none "
                          "needed with gateway.metrics_public)")
    top.add_argument("--interval", type=float, default=2.0,
                     help="seconds between scrapes; figures are over this window "
                          "(default: %(default)s)")
    top.add_argument("--iterations", type=int, default=0,
                     help="print this many frames, then exit (default: until Ctrl-C)")
    top.add_argument("--once", action="store_true", help="one frame (= --iterations 1)")


def _usage_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`maclustr usage`: the usage ledger's sums."""
    usage = sub.add_parser("usage", help="requests and tokens per key, model and day, from the "
                           "usage ledger")
    where_db = usage.add_mutually_exclusive_group()
    where_db.add_argument("--routes", default="routes.yaml",
                          help="routes file whose gateway.usage_db to read (default: "
                               "%(default)s)")
    where_db.add_argument("--db", default=None, help="the ledger file itself")
    usage.add_argument("--since", default=None,
                       help="YYYY-MM-DD (UTC) or a number of days like 7d (default: all)")
    usage.add_argument("--by", default="key,model,day",
                       help="comma list of key, model, day (default: %(default)s)")
    usage.add_argument("--format", choices=["table", "json", "csv"], default="table")


def where(path: str, line: int | None) -> str:
    return f"{path}:{line}" if line else path


def unmatched_policies(table: RouteTable, raw_keys: str | None) -> list[tuple[int | None, str]]:
    """`keys:` entries naming no key of MACLUSTR_API_KEY (when it is set here): a typo, or
    a key not deployed yet. A warning, not an error: keys live in the environment."""
    if table.keys is None or not raw_keys:
        return []
    try:
        names = {name for name, _ in parse_keys(raw_keys)}
    except KeyConfigError:
        return []
    return [(p.line, f"keys.{name} matches no key of MACLUSTR_API_KEY")
            for name, p in table.keys.by_name.items() if name != DEFAULT and name not in names]


def run_check(path: str) -> int:
    try:
        table = load_routes(path)
    except ConfigError as e:
        print(f"maclustr check: {e}", file=sys.stderr)
        return 1
    for line, message in unmatched_policies(table, os.environ.get("MACLUSTR_API_KEY")):
        print(f"maclustr check: {where(path, line)}: warning: {message}", file=sys.stderr)
    if table.nodes:
        from .cluster import node_for, plan_cluster, shard_nodes
        from .sizing import check_fit, check_nodes

        try:
            plans = plan_cluster(table)
        except ConfigError as e:
            print(f"maclustr check: {where(path, e.line)}: {e.message}", file=sys.stderr)
            return 1
        placed = [(r, shard_nodes(r, table.nodes) if r.shards else [node_for(r, table.nodes)])
                  for r in table.routes]
        findings = [f for r, group in placed for f in check_fit(r, group)]
        findings += check_nodes(placed)
        for f in findings:
            print(f"maclustr check: {where(path, f.line)}: {'' if f.error else 'warning: '}"
                  f"{f.message}", file=sys.stderr)
        if any(f.error for f in findings):
            return 1
        print(format_table(table))
        for p in plans:
            gw = [f"gateway :{p.gateway_port}"] if p.gateway else []
            own = [f"{s.alias} :{s.port}" + (f" (rank 0 of {len(s.shards)})" if s.shards else "")
                   for s in p.services]
            ranks = [f"{r.alias} (rank {r.shards.index(p.node.name)} of {len(r.shards)})"
                     for r in table.routes if p.node.name in r.shards[1:]]
            print(f"node {p.node.name} ({p.ssh}): " + ", ".join(gw + own + ranks))
    else:
        print(format_table(table))
    print(f"{path}: OK, {len(table.routes)} models")
    return 0


def run_usage(args: argparse.Namespace) -> int:
    """`maclustr usage`: the ledger's report, the same rows GET /v1/usage answers."""
    import sqlite3

    from .config import usage_db_path
    from .ledger import ReportError, aggregate, parse_by, parse_since, render
    from .usage_db import report_rows

    try:
        since = parse_since(args.since, time.time())
        by = parse_by(args.by)
    except ReportError as e:
        print(f"maclustr usage: {e}", file=sys.stderr)
        return 2
    db = args.db
    if db is None:
        try:
            table = load_routes(args.routes)
        except ConfigError as e:
            print(f"maclustr usage: {e}", file=sys.stderr)
            return 1
        found = usage_db_path(args.routes, table.settings)
        if found is None:
            print(f"maclustr usage: {args.routes} turns the ledger off (gateway.usage_db: "
                  "false)", file=sys.stderr)
            return 1
        db = str(found)
    from pathlib import Path

    try:
        rows = report_rows(Path(db), since)
    except sqlite3.Error as e:
        print(f"maclustr usage: cannot read the ledger {db}: {e}", file=sys.stderr)
        return 1
    try:
        print(render(aggregate(rows, by), by, args.format), flush=True)
    except BrokenPipeError:  # `maclustr usage | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def run_hostfile(path: str, alias: str) -> int:
    """Print the hostfile `mlx.launch --hostfile` reads for a sharded model (deploy ships
    exactly this next to rank 0's plist)."""

    from .cluster import hostfile, plan_cluster

    try:
        table = load_routes(path)
        plan_cluster(table)  # the same validation as check: ports, rank 0, venvs
        route = table.resolve(alias)
        if route is None or route.alias != alias:
            raise ConfigError(f"unknown model '{alias}' (aliases: {', '.join(table.aliases)})")
        if not route.shards:
            raise ConfigError(f"models.{alias} is not sharded (no 'shards:'), so it has no "
                              "hostfile", route.line)
        hosts = hostfile(route, table.nodes)
    except ConfigError as e:
        print(f"maclustr hostfile: {where(path, e.line)}: {e.message}", file=sys.stderr)
        return 1
    print(json.dumps(hosts, indent=2))
    return 0


def run_plists(path: str, node: str, out: str) -> int:
    """Write the node's plists into `out`, removing io.maclustr.* plists no longer rendered,
    so the directory is exactly what the node should run."""
    from pathlib import Path

    from .cluster import plan_for
    from .plists import render_node

    try:
        table = load_routes(path)
        files = render_node(plan_for(table, node), table.settings.shutdown_grace)
    except ConfigError as e:
        print(f"maclustr plists: {where(path, e.line)}: {e.message}", file=sys.stderr)
        return 1
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("io.maclustr.*.plist"):
        if old.name not in files:
            old.unlink()
    for name, data in files.items():
        target = d / name
        if not target.exists() or target.read_bytes() != data:
            target.write_bytes(data)
        print(target)
    return 0


def format_table(table: RouteTable) -> str:
    rows = [("ALIAS", "MODEL", "UPSTREAM", "PARAMETERS", "DESCRIPTION")]
    rows += [(r.alias, r.model, r.upstream, r.parameters, r.description) for r in table.routes]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ).rstrip()


def run_serve(args: argparse.Namespace) -> int:
    # argparse checks --log-level against its choices, but not the default it takes from
    # MACLUSTR_LOG_LEVEL: an unknown value there would otherwise end in a traceback.
    if args.log_level.lower() not in LOG_LEVELS:
        print(f"maclustr serve: MACLUSTR_LOG_LEVEL={args.log_level!r} is not one of "
              f"{', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 2
    handler = configure_logging(args.log_level.upper(), args.log_format)
    try:
        keys = parse_keys(os.environ.get("MACLUSTR_API_KEY"))
    except KeyConfigError as e:
        print(f"maclustr serve: MACLUSTR_API_KEY: {e}", file=sys.stderr)
        return 2
    if not keys:
        print("maclustr serve: MACLUSTR_API_KEY is not set (or empty); refusing to run an "
              "open gateway. Set it to one or more comma-separated keys (name:secret or "
              "secret).", file=sys.stderr)
        return 2
    try:
        table = load_routes(args.routes)
    except ConfigError as e:
        print(f"maclustr serve: {e}", file=sys.stderr)
        return 2
    if args.loop != "asyncio":
        try:
            import uvloop  # installed by default where the platform has it

            uvloop.install()
        except ImportError:
            if args.loop == "uvloop":
                print("maclustr serve: --loop uvloop but uvloop is not installed "
                      "(pip install uvloop)", file=sys.stderr)
                return 2
    ring = KeyRing(keys)
    log.info("keys loaded: %s", ", ".join(ring.names))
    try:
        asyncio.run(_run_gateway(args, table, ring, handler.access_writer()))
    except OSError as e:
        print(f"maclustr serve: cannot listen on {args.host}:{args.port}: {e.strerror}",
              file=sys.stderr)
        return 1
    return 0


async def _run_gateway(args: argparse.Namespace, table: RouteTable, keys: KeyRing,
                 access_writer: Callable[[str], None]) -> None:
    from aiohttp import web

    from .app import make_app
    from .pauses import watch_from_env
    from .protocol import GatewayRunner
    from .reload import RoutesHolder

    holder = RoutesHolder(args.routes, table)
    app = make_app(holder, keys, args.log_format, access_writer)
    grace = table.settings.shutdown_grace
    runner = GatewayRunner(app, handle_signals=False, access_log=None,
                           handler_cancellation=True, shutdown_timeout=1.0,
                           max_field_size=32768, max_line_size=32768)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024, reuse_address=True)
    await site.start()
    # Start-up objects (routes, modules, the app) never die: keep them out of every
    # collection. Requests make no reference cycles (tests/test_collector.py), so their
    # objects are freed by reference counting and gen 0 only fills with objects in flight.
    # Its threshold bounds each pass: 5,000 objects took at most 0.8 ms of CPU (2.8 ms wall
    # on a loaded machine) at 128 connections, where 50,000 let cyclic garbage pile up into
    # 40-70 ms passes (issue 25); a full collection of what is not frozen took under 1 ms.
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, 10, 10)
    pauses = watch_from_env(asyncio.get_running_loop())
    log.info("maclustr %s listening on http://%s:%d with %s", __version__, args.host, args.port,
             ", ".join(table.aliases))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, holder.reload)
    watcher = (asyncio.ensure_future(holder.watch(args.reload_interval))
               if args.reload_interval > 0 else None)
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        if pauses is not None:
            pauses.stop()
        await drain(app, site, grace)
        await runner.cleanup()
        log.info("stopped")


async def drain(app: web.Application, site: web.BaseSite, grace: float) -> None:
    """Stop accepting, give requests in flight `grace` seconds, then cancel the rest, which
    end their streams with a `gateway_shutting_down` error event (relay_stream)."""
    from .app import IN_FLIGHT, SHUTTING_DOWN

    await site.stop()
    app[SHUTTING_DOWN].set()
    in_flight: set[asyncio.Task[object]] = app[IN_FLIGHT]
    tasks = set(in_flight)
    log.info("shutting down: not accepting; %d requests in flight get up to %.0f s",
             len(tasks), grace)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for t in pending:
            t.cancel()
        if pending:
            log.info("grace period over: ending %d requests", len(pending))
            await asyncio.wait(pending, timeout=5)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": run_serve,
    "check": lambda a: run_check(a.routes),
    "plists": lambda a: run_plists(a.routes, a.node, a.out),
    "hostfile": lambda a: run_hostfile(a.routes, a.model),
    "top": run_top,
    "usage": run_usage,
}
