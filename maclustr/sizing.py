"""Memory arithmetic for `maclustr check`: does a model fit where routes.yaml puts it?

Pure. A model needs its weights (`size_gb`: parameters x bytes per weight, what the files
on disk weigh) plus a KV-cache allowance (`kv_gb`, default KV_FRACTION of the weights). A
sharded group splits both evenly over its ranks (tensor parallel splits every layer, pipeline
splits the layers). macOS lets the GPU wire about GPU_FRACTION of a Mac's memory by default,
so that is what a node offers out of `memory_gb`, unless its `gpu_limit_gb` says otherwise
(after `sudo sysctl iogpu.wired_limit_mb=...`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Node, Route

GPU_FRACTION = 0.75
KV_FRACTION = 0.1


@dataclass(frozen=True)
class Finding:
    """One line of `maclustr check` output about a model's memory; errors fail the check."""

    error: bool
    message: str
    line: int | None


def _positive(node: Node, key: str) -> float | None:
    raw = node.extra.get(key)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw <= 0:
        return None
    return float(raw)


def _memory(node: Node) -> float | None:
    return _positive(node, "memory_gb")


def usable_gb(node: Node) -> float:
    """What the GPU may hold on this node: `gpu_limit_gb`, else GPU_FRACTION of memory_gb."""
    return _positive(node, "gpu_limit_gb") or (_memory(node) or 0.0) * GPU_FRACTION


def _offer(node: Node) -> str:
    limit = _positive(node, "gpu_limit_gb")
    return (f"{node.name} offers {usable_gb(node):.1f} GB (gpu_limit_gb)" if limit else
            f"{node.name} offers {usable_gb(node):.1f} GB ({GPU_FRACTION:.0%} of "
            f"{_memory(node):g})")


def need_gb(route: Route) -> tuple[float, float]:
    """(weights, KV-cache allowance) in GB."""
    size = route.size_gb or 0.0
    return size, route.kv_gb if route.kv_gb is not None else round(size * KV_FRACTION, 1)


def check_fit(route: Route, group: list[Node]) -> list[Finding]:
    """For a sharded model with `size_gb` on its shard nodes `group` (rank 0 first): does it
    fit on its shards, and would one node do?"""
    if route.size_gb is None or not route.shards:
        return []
    what = f"models.{route.alias}"
    missing = [n.name for n in group if _memory(n) is None
               and _positive(n, "gpu_limit_gb") is None]
    if missing:
        return [Finding(True, f"{what}: size_gb is set but {', '.join(missing)} has no "
                        f"memory_gb (or gpu_limit_gb) to check it against", route.line)]
    weights, kv = need_gb(route)
    total = weights + kv
    per_rank = total / len(group)
    out: list[Finding] = []
    short = [n for n in group if per_rank > usable_gb(n)]
    if short:
        out.append(Finding(True, (
            f"{what}: does not fit on its {len(group)} shards: each needs {per_rank:.1f} GB "
            f"({weights:g} GB weights + {kv:g} GB KV cache over {len(group)} nodes) but "
            + ", ".join(_offer(n) for n in short)
            + "; add a shard, use a smaller quantization, or raise the GPU limit "
            "(gpu_limit_gb)"), route.line))
    one = [n for n in group if total <= usable_gb(n)]
    if one:
        out.append(Finding(False, (
            f"{what}: would fit on one node anyway ({total:.1f} GB with KV cache <= "
            f"{usable_gb(one[0]):.1f} GB on {one[0].name}); sharding only adds network hops "
            "per token unless you want the extra memory bandwidth"), route.line))
    return out


def check_nodes(placed: list[tuple[Route, list[Node]]]) -> list[Finding]:
    """Every node must hold all it runs: the models with `size_gb` on it (a sharded model
    counts its per-rank share). This is what says a one-node model needs shards."""
    load: dict[str, list[tuple[Route, float]]] = {}
    nodes: dict[str, Node] = {}
    for route, group in placed:
        if route.size_gb is None:
            continue
        share = sum(need_gb(route)) / len(group)
        for n in group:
            nodes[n.name] = n
            load.setdefault(n.name, []).append((route, share))
    out: list[Finding] = []
    for name, items in load.items():
        node = nodes[name]
        used = sum(share for _, share in items)
        if _memory(node) is None and _positive(node, "gpu_limit_gb") is None:
            if not any(r.shards for r, _ in items):  # sharded ones already said so
                out.append(Finding(True, f"models.{items[0][0].alias}: size_gb is set but "
                                   f"{name} has no memory_gb (or gpu_limit_gb) to check it "
                                   "against", items[0][0].line))
            continue
        if used <= usable_gb(node) or (len(items) == 1 and items[0][0].shards):
            continue  # fits, or check_fit already reported the one group
        parts = " + ".join(f"{r.alias} {s:.1f} GB" for r, s in items)
        last = items[-1][0]
        hint = (" (weights + KV cache); shard it over several nodes (shards: [...], see "
                "README 'A model bigger than one Mac')" if len(items) == 1 else
                "; move a model to another node")
        out.append(Finding(True, f"node {name} cannot hold what it runs: {parts} = "
                           f"{used:.1f} GB but {_offer(node)}{hint}", last.line))
    return out
