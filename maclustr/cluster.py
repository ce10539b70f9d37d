"""The cluster plan: which node runs which mlx_lm.server, and the gateway, from routes.yaml.

Pure: no I/O. routes.yaml stays the single source of truth; the deploy commands and
`maclustr check` both go through `plan_cluster`, so a file `check` accepts is a file
`make deploy` can roll out.

Optional node keys read from `Node.extra` (all have defaults derived from the ssh target):
`gateway: true` (the node that runs the gateway; default the first node), `gateway_port`
(9000), `home` (/Users/<ssh user>), `dir` (<home>/maclustr: code in dir/app, routes in
dir/conf), `env_file` (<home>/.config/maclustr/env), `bind` (address mlx servers listen on;
default the upstream URL's host), `env` (extra EnvironmentVariables for mlx servers),
`ips` (addresses the MLX ring uses to reach this node, e.g. its Thunderbolt bridge address;
default its host), `rdma` (jaccl: peer node name -> this node's RDMA device to it),
`memory_gb` (for `maclustr check`'s memory arithmetic).

A sharded model (`shards:`) is one mlx.launch group: rank 0 runs on the first shard node and
serves HTTP on the model's upstream; mlx.launch starts the other ranks over ssh. Only rank
0's node gets a service; every shard node has the model's port and its ring ports reserved.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .config import ConfigError, Node, Route, RouteTable

GATEWAY_LABEL = "io.maclustr.gateway"
MLX_LABEL_PREFIX = "io.maclustr.mlx."
LABEL_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
# Variable names that look like credentials never go into a plist (plists are world-readable).
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD)$", re.IGNORECASE)
DEFAULT_GATEWAY_PORT = 9000
# mlx.launch runs a rank without ssh only when its "ssh" is exactly this (launch.py's
# RemoteProcess); rank 0 runs on the node whose launchd starts the group, so it is local.
LOCAL_SSH = "127.0.0.1"


@dataclass(frozen=True)
class MLXService:
    """One mlx_lm.server: one model on one port of one node."""

    label: str
    alias: str
    model: str
    bind: str
    port: int
    mlx_args: tuple[str, ...]
    shards: tuple[str, ...] = ()  # sharded: node names, rank 0 (this node) first
    backend: str = "ring"
    pipeline: bool = False
    ring_port: int = 0


@dataclass(frozen=True)
class NodePlan:
    """Everything one node runs, with the absolute paths the plists need (launchd does not
    expand `~`)."""

    node: Node
    ssh: str
    home: str
    dir: str
    venv: str
    log_dir: str
    env_file: str
    gateway: bool
    gateway_port: int
    services: tuple[MLXService, ...]
    env: Mapping[str, str]

    @property
    def app_dir(self) -> str:
        return f"{self.dir}/app"

    @property
    def routes_path(self) -> str:
        return f"{self.dir}/conf/routes.yaml"

    @property
    def hosts_dir(self) -> str:
        """Where the MLX hostfiles of the sharded models whose rank 0 is here live."""
        return f"{self.dir}/hosts"

    def hostfile_path(self, svc: MLXService) -> str:
        return f"{self.hosts_dir}/{svc.label}.json"

    @property
    def labels(self) -> tuple[str, ...]:
        own = tuple(s.label for s in self.services)
        return (GATEWAY_LABEL, *own) if self.gateway else own


def ssh_user_host(ssh: str) -> tuple[str | None, str]:
    """`admin@studio-1.local` -> ("admin", "studio-1.local"); a bare host has no user."""
    user, _, host = ssh.rpartition("@")
    return (user or None), host.split(":")[0]


def _norm(host: str) -> str:
    return host.lower().rstrip(".")


def node_hosts(node: Node) -> set[str]:
    """Names an upstream URL may use for this node."""
    hosts = {_norm(ssh_user_host(node.ssh)[1])}
    if node.host:
        hosts.add(_norm(node.host))
    return hosts


def node_for(route: Route, nodes: tuple[Node, ...]) -> Node:
    """The node that runs `route`'s server: its `node:` key, else the node whose host (or
    ssh host) is the upstream's host. The upstream must belong to that node either way."""
    host = _norm(urlsplit(route.upstream).hostname or "")
    what = f"models.{route.alias}"
    if route.node is not None:
        named = next((n for n in nodes if n.name == route.node), None)
        if named is None:
            raise ConfigError(f"{what}.node: unknown node '{route.node}'")
        if host not in node_hosts(named) and host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(
                f"{what}: upstream host '{host}' is not node '{named.name}' "
                f"({', '.join(sorted(node_hosts(named)))}); fix the upstream or set "
                f"nodes.{named.name}.host"
            )
        return named
    matches = [n for n in nodes if host in node_hosts(n)]
    if not matches:
        raise ConfigError(
            f"{what}: upstream host '{host}' is not a declared node "
            f"(declared: {', '.join(n.name for n in nodes)}); set {what}.node or a node's host"
        )
    if len(matches) > 1:
        raise ConfigError(f"{what}: upstream host '{host}' matches several nodes "
                          f"({', '.join(n.name for n in matches)}); set {what}.node")
    return matches[0]


def _extra_str(node: Node, key: str, default: str) -> str:
    value = node.extra.get(key)
    if value is None:
        return default
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise ConfigError(f"nodes.{node.name}.{key} must be a non-empty string")
    return str(value).strip()


def _paths(node: Node) -> tuple[str, str, str, str, str]:
    user, _ = ssh_user_host(node.ssh)
    home_default = f"/Users/{user}" if user else None
    home = _extra_str(node, "home", home_default or "")
    if not home:
        raise ConfigError(f"nodes.{node.name}: ssh target '{node.ssh}' has no user; "
                          f"set nodes.{node.name}.home (absolute; launchd does not expand ~)")
    d = _extra_str(node, "dir", f"{home}/maclustr")
    venv = node.venv or f"{d}/venv"
    log_dir = node.log_dir or f"{home}/Library/Logs/maclustr"
    env_file = _extra_str(node, "env_file", f"{home}/.config/maclustr/env")
    for key, p in (("home", home), ("dir", d), ("venv", venv), ("log_dir", log_dir),
                   ("env_file", env_file)):
        if not p.startswith("/"):
            raise ConfigError(f"nodes.{node.name}.{key} must be an absolute path, got '{p}'")
    return home, d, venv, log_dir, env_file


def _env(node: Node) -> dict[str, str]:
    raw = node.extra.get("env", {}) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"nodes.{node.name}.env must be a mapping of NAME: value")
    out: dict[str, str] = {}
    for k, v in raw.items():
        if SECRET_NAME.search(str(k)):
            raise ConfigError(f"nodes.{node.name}.env.{k}: secrets do not go in routes.yaml or "
                              f"plists; put them in the node's env_file")
        out[str(k)] = "" if v is None else str(v)
    return out


def node_ips(node: Node) -> list[str]:
    """The addresses the ring uses for this node: `ips:`, else its host (or ssh host)."""
    raw = node.extra.get("ips")
    if raw is None:
        return [node.host or ssh_user_host(node.ssh)[1]]
    if not isinstance(raw, list) or not raw or not all(
            isinstance(x, str) and x.strip() for x in raw):
        raise ConfigError(f"nodes.{node.name}.ips must be a non-empty list of addresses")
    return [x.strip() for x in raw]


def _rdma(node: Node, peer: str, route: Route) -> str:
    raw = node.extra.get("rdma")
    dev = raw.get(peer) if isinstance(raw, Mapping) else None
    if not isinstance(dev, str) or not dev.strip():
        raise ConfigError(f"models.{route.alias}: backend jaccl needs nodes.{node.name}.rdma."
                          f"{peer} (the RDMA device on {node.name} cabled to {peer}, e.g. "
                          f"rdma_en3)", route.line)
    return dev.strip()


def shard_nodes(route: Route, nodes: tuple[Node, ...]) -> list[Node]:
    by_name = {n.name: n for n in nodes}
    return [by_name[s] for s in route.shards]


def hostfile(route: Route, nodes: tuple[Node, ...]) -> list[dict[str, Any]]:
    """MLX's hostfile for a sharded model: one {"ssh", "ips"} per rank, rank 0 first (jaccl
    adds "rdma": the device towards every other rank, null for itself)."""
    group = shard_nodes(route, nodes)
    out: list[dict[str, Any]] = []
    for rank, n in enumerate(group):
        entry: dict[str, Any] = {"ssh": LOCAL_SSH if rank == 0 else n.ssh, "ips": node_ips(n)}
        if route.backend == "jaccl":
            entry["rdma"] = [None if peer is n else _rdma(n, peer.name, route)
                             for peer in group]
        out.append(entry)
    return out


def ring_ports(route: Route, nodes: tuple[Node, ...]) -> list[tuple[str, int]]:
    """(node name, port) every rank listens on besides HTTP: mlx.launch gives the ring one
    port per rank and address from --starting-port up; jaccl's coordinator takes that port
    on rank 0."""
    group = shard_nodes(route, nodes)
    if route.backend == "jaccl":
        return [(group[0].name, route.ring_port)]
    out: list[tuple[str, int]] = []
    port = route.ring_port
    for n in group:
        for _ in node_ips(n):
            out.append((n.name, port))
            port += 1
    return out


def _rank0(route: Route, nodes: tuple[Node, ...]) -> Node:
    """The first shard node, which must be where `upstream` points (rank 0 serves HTTP)."""
    first = shard_nodes(route, nodes)[0]
    host = _norm(urlsplit(route.upstream).hostname or "")
    if host not in node_hosts(first) and host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(
            f"models.{route.alias}: rank 0 runs on the first shard node '{first.name}', but "
            f"upstream host '{host}' is not that node ({', '.join(sorted(node_hosts(first)))}); "
            f"list rank 0's node first or fix the upstream", route.line)
    venvs = {n.name: _paths(n)[2] for n in shard_nodes(route, nodes)}
    if len(set(venvs.values())) > 1:
        raise ConfigError(
            f"models.{route.alias}: mlx.launch runs one command on every rank, so the shard "
            f"nodes need the same venv path ({', '.join(f'{k}: {v}' for k, v in venvs.items())})",
            route.line)
    return first


def plan_cluster(table: RouteTable) -> tuple[NodePlan, ...]:
    """Validate the `nodes:` section against the models and return one plan per node.

    Raises ConfigError when a model's upstream is not on a declared node, when two models
    (or a model and the gateway) share a port on one node, or when a path is unusable.
    """
    nodes = table.nodes
    if not nodes:
        raise ConfigError("no 'nodes:' section: the deploy commands need one "
                          "(name: user@host, or a mapping with ssh/host/venv/log_dir)")
    gateways = [n for n in nodes if n.extra.get("gateway") is True]
    if len(gateways) > 1:
        raise ConfigError(f"several nodes have gateway: true "
                          f"({', '.join(n.name for n in gateways)}); pick one")
    gateway_node = gateways[0] if gateways else nodes[0]
    per_node: dict[str, list[MLXService]] = {n.name: [] for n in nodes}
    ports: dict[tuple[str, int], str] = {}
    gw_port = gateway_node.extra.get("gateway_port", DEFAULT_GATEWAY_PORT)
    if isinstance(gw_port, bool) or not isinstance(gw_port, int) or not 0 < gw_port < 65536:
        raise ConfigError(f"nodes.{gateway_node.name}.gateway_port must be a port number")
    ports[(gateway_node.name, gw_port)] = "the gateway"
    for r in table.routes:
        node = _rank0(r, nodes) if r.shards else node_for(r, nodes)
        if r.shards:
            hostfile(r, nodes)  # every rank has addresses (and, for jaccl, RDMA devices)
        parts = urlsplit(r.upstream)
        if parts.port is None:
            raise ConfigError(f"models.{r.alias}.upstream: give the port explicitly "
                              f"(mlx_lm.server needs --port), e.g. http://host:8081", r.line)
        if not LABEL_SAFE.match(r.alias):
            raise ConfigError(f"models.{r.alias}: alias must be letters, digits, '.', '_' or '-' "
                              f"to name its launchd service", r.line)
        # a group holds its HTTP port on every shard node (any rank may become rank 0 after
        # a re-homing) and its ring ports on the node of each rank
        wanted = [(node.name, parts.port, "port")]
        wanted += [(name, parts.port, "port") for name in r.shards[1:]]
        wanted += [(name, p, "ring port") for name, p in ring_ports(r, nodes)] if r.shards \
            else []
        for name, port, kind in wanted:
            other = ports.get((name, port))
            if other is not None:
                raise ConfigError(f"models.{r.alias}: {kind} {port} on node '{name}' is "
                                  f"already used by {other}", r.line)
            ports[(name, port)] = f"models.{r.alias}"
        bind = _extra_str(node, "bind", parts.hostname or "127.0.0.1")
        per_node[node.name].append(MLXService(
            label=MLX_LABEL_PREFIX + r.alias, alias=r.alias, model=r.model, bind=bind,
            port=parts.port, mlx_args=r.mlx_args, shards=r.shards, backend=r.backend,
            pipeline=r.pipeline, ring_port=r.ring_port,
        ))
    plans = []
    for n in nodes:
        home, d, venv, log_dir, env_file = _paths(n)
        plans.append(NodePlan(
            node=n, ssh=n.ssh, home=home, dir=d, venv=venv, log_dir=log_dir, env_file=env_file,
            gateway=n is gateway_node, gateway_port=gw_port, services=tuple(per_node[n.name]),
            env=_env(n),
        ))
    return tuple(plans)


def plan_for(table: RouteTable, name: str) -> NodePlan:
    for p in plan_cluster(table):
        if p.node.name == name:
            return p
    raise ConfigError(f"unknown node '{name}' (declared: "
                      f"{', '.join(n.name for n in table.nodes)})")
