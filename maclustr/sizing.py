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


def check_fit(route: Route, nodes: tuple[Node, ...]) -> list[Finding]:
    """For a model with `size_gb`: does it fit on its shards, and would one node do?"""
    if route.size_gb is None or not route.shards:
        return []
    by_name = {n.name: n for n in nodes}
    group = [by_name[s] for s in route.shards if s in by_name]
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
