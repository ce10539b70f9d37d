"""Which command restarts a replica: the model's `restart` argv, else the launchd job that
`make deploy` installed on the replica's node (over ssh unless it is the gateway's own node).

Pure: the caller passes the uid for the local form (`$(id -u)` is left to the remote shell).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from .cluster import MLX_LABEL_PREFIX, node_hosts
from .config import Node, Route
from .heal import render

TAIL_CHARS = 400  # of a failed command's output, in its log line


def kickstart(alias: str, uid: str = "$(id -u)") -> str:
    """launchctl's restart of the job `make deploy` installs for `alias` (cluster.py's label)."""
    return f"launchctl kickstart -k gui/{uid}/{MLX_LABEL_PREFIX}{alias}"


def replica_node(route: Route, url: str, nodes: Sequence[Node]) -> Node | None:
    """The node that runs the replica at `url`: rank 0's for a sharded model (its mlx.launch
    job restarts the group), the model's `node:` for its first upstream, else the node whose
    host is the URL's."""
    by_name = {n.name: n for n in nodes}
    if route.shards:
        return by_name.get(route.shards[0])
    if route.node is not None and url == route.upstream:
        return by_name.get(route.node)
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    matches = [n for n in nodes if host in node_hosts(n)]
    return matches[0] if len(matches) == 1 else None


def gateway_node(nodes: Sequence[Node]) -> Node | None:
    """The node that runs the gateway: `gateway: true`, else the first (as cluster.py)."""
    return next((n for n in nodes if n.extra.get("gateway") is True), nodes[0] if nodes else None)


def restart_argv(route: Route, url: str, nodes: Sequence[Node], uid: int,
                 command: Sequence[str] | None = None) -> tuple[str, ...] | None:
    """The command that restarts the replica at `url`: the model's `restart`, else the launchd
    job of its node (over ssh unless it is the gateway's own node), else None."""
    if command:
        return render(command, route.alias, url)
    node = replica_node(route, url, nodes)
    if node is None:
        return None
    if node is gateway_node(nodes):
        return tuple(kickstart(route.alias, str(uid)).split())
    return ("ssh", node.ssh, kickstart(route.alias))


def mask(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def describe(argv: Sequence[str], secrets: Iterable[str] = ()) -> str:
    """The command's words for a log line, any known secret masked."""
    return mask(shlex.join(argv), secrets)


def output_tail(output: bytes, secrets: Iterable[str] = (), limit: int = TAIL_CHARS) -> str:
    """The end of a command's output for its log line, with any known secret masked."""
    text = " ".join(mask(output.decode("utf-8", "replace"), secrets).split())
    return text[-limit:]
