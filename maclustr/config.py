"""The route table: which public alias goes to which internal model on which server.

Pure: no I/O beyond reading the file in `load_routes`, no aiohttp. A `RouteTable` is
immutable and carries its lookup index, so a reload swaps one reference and a request
that took a snapshot keeps a consistent view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .config_keys import KEYS, MLX_DECODE_CONCURRENCY, RING_PORT, default_of, keys_of
from .heal import PLACEHOLDERS, unknown_placeholders
from .policy import POLICY_FIELDS, KeyPolicy, Policies

# The allowed keys of each section, from their one declaration (config_keys.py).
TOP_KEYS = keys_of("top")
MODEL_KEYS = keys_of("model")
TIMEOUT_KEYS = keys_of("timeouts")
GATEWAY_KEYS = keys_of("gateway")
NODE_KEYS = keys_of("node")
SHARD_BACKENDS = ("ring", "jaccl")  # mlx.launch backends a sharded model may use
__all__ = ["MLX_DECODE_CONCURRENCY", "RING_PORT"]  # re-exported for cluster/sizing readers
USAGE_DB = "maclustr-usage.sqlite3"  # the ledger's default file, beside the routes file


class ConfigError(ValueError):
    """A routes file that must not be served. `line` is 1-based, or None when unknown."""

    def __init__(self, message: str, line: int | None = None, source: str = "routes.yaml") -> None:
        self.message = message
        self.line = line
        self.source = source
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Timeouts:
    """Seconds. `first_byte` covers model load plus a whole unary generation, so it is long;
    `idle` is the longest silence allowed once bytes flow (mlx keepalive comments count)."""

    connect: float = default_of("timeouts", "connect")
    first_byte: float = default_of("timeouts", "first_byte")
    idle: float = default_of("timeouts", "idle")


@dataclass(frozen=True)
class Route:
    """One public alias. `model` and `upstream` are internal and never shown to clients."""

    alias: str
    model: str
    upstream: str  # first replica's base URL without trailing slash: http://studio-1.local:8081
    description: str = ""
    parameters: str = ""
    timeouts: Timeouts = Timeouts()
    api_key_env: str | None = None
    node: str | None = None
    mlx_args: tuple[str, ...] = ()
    upstreams: tuple[str, ...] = ()  # every replica, `upstream` first; filled when empty
    max_concurrency: int = MLX_DECODE_CONCURRENCY  # requests in flight per replica
    max_queue: int = default_of("model", "max_queue")  # requests waiting for a slot, per model
    queue_timeout: float = default_of("model", "queue_timeout")  # seconds waiting for a slot
    warmup: bool = default_of("model", "warmup")
    # A model sharded over several nodes (mlx.launch): node names, rank 0 first; `upstream`
    # is rank 0's HTTP address, the only one the gateway talks to.
    shards: tuple[str, ...] = ()
    backend: str = default_of("model", "backend")
    pipeline: bool = default_of("model", "pipeline")
    ring_port: int = default_of("model", "ring_port")
    size_gb: float | None = None  # weights on disk, for `maclustr check`'s memory arithmetic
    kv_gb: float | None = None  # KV-cache allowance; default a fraction of size_gb
    # Self-healing (heal.py): seconds without a byte, with requests in flight, before a
    # replica is suspect; and the argv that restarts a replica (placeholders {alias}, {host},
    # {port}, {url}); None: the node's launchd job, when the model is placed on a node.
    stall_after: float = default_of("model", "stall_after")
    restart: tuple[str, ...] | None = None
    line: int | None = field(default=None, compare=False)  # of the alias in routes.yaml

    def __post_init__(self) -> None:
        if not self.upstreams:
            object.__setattr__(self, "upstreams", (self.upstream,))

    @property
    def placement(self) -> str:
        """What the public may know about where a model runs (deep health, front page): how
        many nodes share a sharded model, never which."""
        return f"sharded over {len(self.shards)} nodes" if self.shards else ""


@dataclass(frozen=True)
class GatewaySettings:
    """The `gateway:` section; each field is its key (meanings in config_keys.py)."""

    max_body_bytes: int = default_of("gateway", "max_body_bytes")
    shutdown_grace: float = default_of("gateway", "shutdown_grace")
    cors_origins: tuple[str, ...] = default_of("gateway", "cors_origins")
    public_url: str | None = default_of("gateway", "public_url")
    health_timeout: float = default_of("gateway", "health_timeout")
    generate_timeout: float = default_of("gateway", "generate_timeout")
    probe_generate: bool = default_of("gateway", "probe_generate")
    metrics: bool = default_of("gateway", "metrics")
    metrics_public: bool = default_of("gateway", "metrics_public")
    restart_limit: int = default_of("gateway", "restart_limit")
    # The usage ledger (SQLite): a path (relative: to the routes file's directory), None for
    # the default file, False for none (no recording, no token limits). Read at start.
    usage_db: str | bool | None = None
    usage_retention_days: int = default_of("gateway", "usage_retention_days")


@dataclass(frozen=True)
class Node:
    """A machine of the cluster, used by the deploy commands only."""

    name: str
    ssh: str
    host: str | None = None
    venv: str | None = None
    log_dir: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RouteTable:
    """The whole configuration, immutable. `resolve` accepts an alias or an internal id."""

    routes: tuple[Route, ...]
    settings: GatewaySettings = GatewaySettings()
    nodes: tuple[Node, ...] = ()
    keys: Policies | None = None  # the `keys:` section; None: every key admin, no limits
    _index: Mapping[str, Route] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, Route] = {}
        for r in self.routes:
            index.setdefault(r.model, r)
        for r in self.routes:  # aliases win over ids if they ever collide
            index[r.alias] = r
        object.__setattr__(self, "_index", index)

    def resolve(self, name: str) -> Route | None:
        return self._index.get(name)

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(r.alias for r in self.routes)

    @property
    def upstreams(self) -> tuple[str, ...]:
        """Distinct internal servers (every replica), in table order."""
        return tuple(dict.fromkeys(u for r in self.routes for u in r.upstreams))


def usage_db_path(routes: str | Path, settings: GatewaySettings) -> Path | None:
    """Where the usage ledger lives (None: `gateway.usage_db: false`); a relative path is
    beside the routes file."""
    if settings.usage_db is False:
        return None
    name = settings.usage_db if isinstance(settings.usage_db, str) else USAGE_DB
    p = Path(name).expanduser()
    return p if p.is_absolute() else Path(routes).resolve().parent / p


# --- parsing -------------------------------------------------------------------------------


def load_routes(path: str | Path) -> RouteTable:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read file ({e.strerror})", None, str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError("file is not UTF-8", None, str(p)) from None
    return parse_routes(text, str(p))


def parse_routes(text: str, source: str = "routes.yaml") -> RouteTable:
    """Parse and validate a routes file; raise ConfigError naming the line and key at fault."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", line, source) from None
    p = _Parser(source)
    return p.table(root)


class _Parser:
    """Walks the YAML node tree so every error can name its line."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, msg: str, node: yaml.Node | None) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else None
        return ConfigError(msg, line, self.source)

    def mapping(self, node: yaml.Node | None, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(f"{what} must be a mapping", node)
        out: list[tuple[str, yaml.Node, yaml.Node]] = []
        seen: set[str] = set()
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise self.fail(f"{what}: keys must be plain strings", k)
            key = str(k.value)
            if key in seen:
                raise self.fail(f"{what}: duplicate key '{key}'", k)
            seen.add(key)
            out.append((key, k, v))
        return out

    def check_keys(self, items: list[tuple[str, yaml.Node, yaml.Node]], allowed: frozenset[str],
                   what: str) -> dict[str, yaml.Node]:
        for key, knode, _ in items:
            if key not in allowed:
                raise self.fail(
                    f"{what}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))})", knode
                )
        return {key: v for key, _, v in items}

    def scalar(self, node: yaml.Node) -> Any:
        return yaml.SafeLoader(  # construct one scalar with the standard resolver
            ""
        ).construct_object(node, deep=True)

    def string(self, node: yaml.Node, what: str, *, empty_ok: bool = False) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(f"{what} must be a string", node)
        value = self.scalar(node)
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise self.fail(f"{what} must be a string", node)
        s = str(value).strip()
        if not s and not empty_ok:
            raise self.fail(f"{what} must not be empty", node)
        return s

    def number(self, node: yaml.Node, what: str) -> float:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{what} must be a number", node)
        if not math.isfinite(value) or value <= 0:
            raise self.fail(f"{what} must be a positive number", node)
        return float(value)

    def timeouts(self, node: yaml.Node, base: Timeouts, what: str) -> Timeouts:
        items = self.check_keys(self.mapping(node, what), TIMEOUT_KEYS, what)
        values = {k: self.value("seconds", v, f"{what}.{k}") for k, v in items.items()}
        return Timeouts(
            connect=values.get("connect", base.connect),
            first_byte=values.get("first_byte", base.first_byte),
            idle=values.get("idle", base.idle),
        )

    def url(self, node: yaml.Node, what: str) -> str:
        raw = self.string(node, what)
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(f"{what} must be an http(s) URL like http://host:8081, got '{raw}'",
                            node)
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise self.fail(f"{what} has an invalid port: '{raw}'", node) from None
        if parts.query or parts.fragment:
            raise self.fail(f"{what} must not have a query or fragment: '{raw}'", node)
        return raw.rstrip("/")

    def upstream_url(self, node: yaml.Node, what: str) -> str:
        """A model server's base URL: no path, since the gateway sends to /v1/... on it and a
        path would be dropped silently."""
        url = self.url(node, what)
        path = urlsplit(url).path
        if path not in ("", "/"):
            raise self.fail(f"{what} must not have a path ('{path}'): give the server's "
                            f"scheme, host and port only, like http://host:8081", node)
        return url

    def settings(self, node: yaml.Node) -> GatewaySettings:
        items = self.check_keys(self.mapping(node, "gateway"), GATEWAY_KEYS, "gateway")
        values: dict[str, Any] = {}
        for name, n in items.items():
            kind = next(k.kind for k in KEYS if k.where == "gateway" and k.name == name)
            values[name] = self.usage_db(n) if name == "usage_db" \
                else self.value(kind, n, f"gateway.{name}")
        return GatewaySettings(**values)

    def value(self, kind: str, node: yaml.Node, what: str) -> Any:
        """A plain key's value by its declared kind (config_keys.KINDS)."""
        if kind == "seconds" or kind == "number":
            return self.number(node, what)
        if kind == "bytes":
            return int(self.number(node, what))
        if kind in ("count", "count0"):
            return self.integer(node, what, minimum=1 if kind == "count" else 0)
        if kind == "flag":
            return self.boolean(node, what)
        if kind == "url":
            return self.url(node, what)
        if kind == "text":
            return self.string(node, what)
        if kind == "texts":
            if not isinstance(node, yaml.SequenceNode):
                raise self.fail(f"{what} must be a list of strings", node)
            return tuple(self.string(x, f"{what}[]") for x in node.value)
        raise AssertionError(f"{what}: kind {kind!r} is parsed by hand")

    def usage_db(self, node: yaml.Node) -> str | bool:
        """`false` (no ledger) or a file path."""
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if value is False:
            return False
        if value is True:
            raise self.fail("gateway.usage_db must be a file path or false", node)
        return self.string(node, "gateway.usage_db")

    def policies(self, node: yaml.Node, aliases: set[str]) -> Policies:
        """The `keys:` section: a policy per key name (`"*"`: every key without one)."""
        out: dict[str, KeyPolicy] = {}
        for name, knode, v in self.mapping(node, "keys"):
            what = f"keys.{name}"
            if isinstance(v, yaml.ScalarNode) and self.scalar(v) is None:
                out[name] = KeyPolicy(line=knode.start_mark.line + 1)
                continue
            items = self.check_keys(self.mapping(v, what), frozenset(POLICY_FIELDS), what)
            values: dict[str, Any] = {}
            for field_name, n in items.items():
                kind = POLICY_FIELDS[field_name]
                f = f"{what}.{field_name}"
                if kind == "flag":
                    values[field_name] = self.boolean(n, f)
                elif kind == "limit":
                    values[field_name] = self.integer(n, f)
                else:
                    values[field_name] = self.aliases(n, f, aliases)
            out[name] = KeyPolicy(**values, line=knode.start_mark.line + 1)
        return Policies(out)

    def aliases(self, node: yaml.Node, what: str, known: set[str]) -> frozenset[str]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(f"{what} must be a list of model aliases", node)
        out = set()
        for x in node.value:
            alias = self.string(x, f"{what}[]")
            if alias not in known:
                raise self.fail(f"{what}: unknown alias '{alias}' (aliases: "
                                f"{', '.join(sorted(known))})", x)
            out.add(alias)
        return frozenset(out)

    def nodes(self, node: yaml.Node) -> tuple[Node, ...]:
        out = []
        for name, knode, v in self.mapping(node, "nodes"):
            what = f"nodes.{name}"
            if isinstance(v, yaml.ScalarNode):
                out.append(Node(name=name, ssh=self.string(v, what)))
                continue
            d = self.check_keys(self.mapping(v, what), NODE_KEYS, what)
            if "ssh" not in d:
                raise self.fail(f"{what}: missing required key 'ssh'", knode)
            known = {"ssh", "host", "venv", "log_dir"}
            extra = {k: self.scalar(n) for k, n in d.items() if k not in known}
            out.append(Node(
                name=name,
                ssh=self.string(d["ssh"], f"{what}.ssh"),
                host=self.string(d["host"], f"{what}.host") if "host" in d else None,
                venv=self.string(d["venv"], f"{what}.venv") if "venv" in d else None,
                log_dir=self.string(d["log_dir"], f"{what}.log_dir") if "log_dir" in d else None,
                extra=extra,
            ))
        return tuple(out)

    def shards(self, items: dict[str, yaml.Node], what: str,
               node_names: set[str]) -> tuple[str, ...]:
        """`shards: [studio-1, studio-2]`: at least two distinct declared nodes, rank 0 first."""
        if "shards" not in items:
            for key in ("backend", "pipeline", "ring_port"):
                if key in items:
                    raise self.fail(f"{what}.{key} applies to a sharded model only (add "
                                    f"'shards: [node, node, ...]')", items[key])
            return ()
        n = items["shards"]
        if not isinstance(n, yaml.SequenceNode) or len(n.value) < 2:
            raise self.fail(f"{what}.shards must list at least two nodes (rank 0 first); a "
                            "model on one node uses 'upstream' alone", n)
        if "node" in items or "upstreams" in items:
            raise self.fail(f"{what}: a sharded model is one group behind one 'upstream' (rank "
                            "0's address); drop 'node'/'upstreams'", n)
        if not node_names:
            raise self.fail(f"{what}.shards names nodes, but there is no 'nodes:' section", n)
        names: list[str] = []
        for x in n.value:
            name = self.string(x, f"{what}.shards[]")
            if name not in node_names:
                raise self.fail(f"{what}.shards: unknown node '{name}' (declared: "
                                f"{', '.join(sorted(node_names))})", x)
            if name in names:
                raise self.fail(f"{what}.shards lists node '{name}' twice", x)
            names.append(name)
        return tuple(names)

    def route(self, alias: str, knode: yaml.Node, node: yaml.Node, base: Timeouts,
              node_names: set[str] | None = None) -> Route:
        what = f"models.{alias}"
        if isinstance(node, yaml.ScalarNode) and self.scalar(node) is None:
            raise self.fail(f"{what}: missing required keys 'model' and 'upstream'", knode)
        items = self.check_keys(self.mapping(node, what), MODEL_KEYS, what)
        if "model" not in items:
            raise self.fail(f"{what}: missing required key 'model'", knode)
        if ("upstream" in items) == ("upstreams" in items):
            raise self.fail(f"{what}: missing required key 'upstream' (or a list 'upstreams', "
                            "not both)", knode)
        if "upstream" in items:
            upstreams: tuple[str, ...] = (self.upstream_url(items["upstream"],
                                                            f"{what}.upstream"),)
        else:
            n = items["upstreams"]
            if not isinstance(n, yaml.SequenceNode) or not n.value:
                raise self.fail(f"{what}.upstreams must be a non-empty list of URLs", n)
            upstreams = tuple(self.upstream_url(x, f"{what}.upstreams[]") for x in n.value)
            if len(set(upstreams)) != len(upstreams):
                raise self.fail(f"{what}.upstreams lists a URL twice", n)
        decode = _flag_value(mlx_args_of(self, items, what), "--decode-concurrency")
        shards = self.shards(items, what, node_names or set())
        backend = self.string(items["backend"], f"{what}.backend") if "backend" in items \
            else Route.backend
        if backend not in SHARD_BACKENDS:
            raise self.fail(f"{what}.backend must be one of {', '.join(SHARD_BACKENDS)}, got "
                            f"'{backend}'", items["backend"])
        ring_port = self.integer(items["ring_port"], f"{what}.ring_port", minimum=1024) \
            if "ring_port" in items else Route.ring_port
        if ring_port > 65535:
            raise self.fail(f"{what}.ring_port must be a port number", items["ring_port"])
        return Route(
            shards=shards,
            backend=backend,
            pipeline=self.boolean(items["pipeline"], f"{what}.pipeline") if "pipeline" in items
            else False,
            ring_port=ring_port,
            size_gb=self.number(items["size_gb"], f"{what}.size_gb") if "size_gb" in items
            else None,
            kv_gb=self.number(items["kv_gb"], f"{what}.kv_gb") if "kv_gb" in items else None,
            line=knode.start_mark.line + 1,
            alias=alias,
            model=self.string(items["model"], f"{what}.model"),
            upstream=upstreams[0],
            upstreams=upstreams,
            max_concurrency=self.integer(items["max_concurrency"], f"{what}.max_concurrency")
            if "max_concurrency" in items else (decode or MLX_DECODE_CONCURRENCY),
            max_queue=self.integer(items["max_queue"], f"{what}.max_queue", minimum=0)
            if "max_queue" in items else Route.max_queue,
            queue_timeout=self.number(items["queue_timeout"], f"{what}.queue_timeout")
            if "queue_timeout" in items else Route.queue_timeout,
            warmup=self.boolean(items["warmup"], f"{what}.warmup") if "warmup" in items
            else False,
            description=self.string(items["description"], f"{what}.description", empty_ok=True)
            if "description" in items else "",
            parameters=self.string(items["parameters"], f"{what}.parameters", empty_ok=True)
            if "parameters" in items else "",
            timeouts=self.timeouts(items["timeouts"], base, f"{what}.timeouts")
            if "timeouts" in items else base,
            api_key_env=self.string(items["api_key_env"], f"{what}.api_key_env")
            if "api_key_env" in items else None,
            node=self.string(items["node"], f"{what}.node") if "node" in items else None,
            mlx_args=mlx_args_of(self, items, what),
            stall_after=self.number(items["stall_after"], f"{what}.stall_after")
            if "stall_after" in items else Route.stall_after,
            restart=self.restart(items["restart"], f"{what}.restart")
            if "restart" in items else None,
        )

    def restart(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        """An argv (no shell): a non-empty list of strings whose only placeholders are
        PLACEHOLDERS; `{{` is a literal brace."""
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(f"{what} must be a non-empty list of strings (a command and its "
                            "arguments, no shell)", node)
        argv = []
        for x in node.value:
            arg = self.string(x, f"{what}[]")
            bad = unknown_placeholders((arg,))
            if bad:
                raise self.fail(f"{what}: unknown placeholder {', '.join(map(repr, bad))} in "
                                f"'{arg}' (known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
                                "; write {{ and }} for literal braces)", x)
            argv.append(arg)
        return tuple(argv)

    def integer(self, node: yaml.Node, what: str, minimum: int = 1) -> int:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(f"{what} must be an integer >= {minimum}", node)
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, bool):
            raise self.fail(f"{what} must be true or false", node)
        return value

    def table(self, root: yaml.Node | None) -> RouteTable:
        if root is None:
            raise ConfigError("file is empty: expected a 'models:' mapping", None, self.source)
        top = self.check_keys(self.mapping(root, "top level"), TOP_KEYS, "top level")
        if "models" not in top:
            raise self.fail("missing required key 'models'", root)
        base = self.timeouts(top["timeouts"], Timeouts(), "timeouts") if "timeouts" in top \
            else Timeouts()
        settings = self.settings(top["gateway"]) if "gateway" in top else GatewaySettings()
        nodes = self.nodes(top["nodes"]) if "nodes" in top else ()
        routes: list[Route] = []
        owners: dict[str, tuple[str, yaml.Node]] = {}
        model_items = self.mapping(top["models"], "models")
        if not model_items:
            raise self.fail("'models' is empty: at least one alias is required", top["models"])
        node_names = {n.name for n in nodes}
        for alias, knode, vnode in model_items:
            if not alias or any(c.isspace() for c in alias):
                raise self.fail(f"models: alias '{alias}' must be non-empty without spaces", knode)
            r = self.route(alias, knode, vnode, base, node_names)
            for name in (r.alias, r.model):
                other = owners.get(name)
                if other is not None and other[0] != alias:
                    raise self.fail(
                        f"models.{alias}: '{name}' is already used by models.{other[0]}", knode
                    )
            owners[r.alias] = (alias, knode)
            owners[r.model] = (alias, knode)
            routes.append(r)
        for r in routes:
            if r.node is not None and nodes and r.node not in node_names:
                raise ConfigError(f"models.{r.alias}.node: unknown node '{r.node}'", None,
                                  self.source)
        keys = self.policies(top["keys"], {r.alias for r in routes}) if "keys" in top else None
        return RouteTable(routes=tuple(routes), settings=settings, nodes=nodes, keys=keys)


def mlx_args_of(p: _Parser, items: dict[str, yaml.Node], what: str) -> tuple[str, ...]:
    if "mlx_args" not in items:
        return ()
    n = items["mlx_args"]
    if not isinstance(n, yaml.SequenceNode):
        raise p.fail(f"{what}.mlx_args must be a list of strings", n)
    return tuple(p.string(x, f"{what}.mlx_args[]") for x in n.value)


def _flag_value(args: tuple[str, ...], flag: str) -> int | None:
    """`--flag N` or `--flag=N` in an argument list, as an int (None when absent or odd)."""
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith(flag + "=") else (
            args[i + 1] if a == flag and i + 1 < len(args) else None)
        if value is not None:
            return int(value) if value.isdigit() and int(value) > 0 else None
    return None
