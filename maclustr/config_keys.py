"""Every routes.yaml key, declared once: where it goes, its type, its default, what it means.

Pure data. config.py takes its allowed key sets, its defaults and the parsing of the plain
keys from here, and README's routes.yaml table is rendered from here (`python -m
maclustr.config_keys` prints it; tests/test_config.py checks the README holds exactly that).

To add a key: one `Key(...)` line in KEYS below, in its section. A plain key of `gateway` or
`timeouts` (a kind in KINDS) is then parsed and defaulted with no other change: add the field
of the same name to GatewaySettings / Timeouts with `default_of(...)`. A model key gets its
Route field the same way and its parse line in config._Parser.route; a node key is read from
`Node.extra`; a `keys:` field is policy.POLICY_FIELDS' too. Then paste the new README table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .heal import DEFAULT_RESTART_LIMIT, DEFAULT_STALL_AFTER

MiB = 1024 * 1024
RING_PORT = 32323  # mlx.launch's --starting-port default
MLX_DECODE_CONCURRENCY = 32  # mlx_lm.server's --decode-concurrency default (mlx-lm 0.32)

# Where a key goes, as the README says it.
WHERE = {
    "top": "top level",
    "timeouts": "`timeouts:` (top level, or per model to override)",
    "model": "`models.<alias>`",
    "gateway": "`gateway:`",
    "node": "`nodes.<name>`",
    "keys": "`keys.<key name>`",
}
# Kinds the parser reads generically (config._Parser.value), as the README names them.
KINDS = {
    "seconds": "seconds > 0", "count": "integer ≥ 1", "count0": "integer ≥ 0",
    "flag": "true / false", "url": "http(s) URL", "text": "string", "texts": "list of strings",
    "number": "number > 0", "bytes": "bytes > 0",
}


@dataclass(frozen=True)
class Key:
    name: str
    where: str  # a WHERE key
    kind: str  # a KINDS key, or words for a key parsed by hand
    default: Any  # the value when absent (None: none), or a string saying how it is derived
    meaning: str
    derived: bool = False  # `default` describes a computed default instead of being it

    @property
    def type_text(self) -> str:
        return KINDS.get(self.kind, self.kind)

    @property
    def default_text(self) -> str:
        if self.derived:
            return str(self.default)
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if self.default == ():
            return "[]"
        return f"`{self.default}`"


KEYS: tuple[Key, ...] = (
    # --- top level
    Key("models", "top", "mapping", "required", "public alias -> its model (below)",
        derived=True),
    Key("timeouts", "top", "mapping", "the timeouts below", "defaults for every model",
        derived=True),
    Key("gateway", "top", "mapping", "the gateway keys below", "the gateway's own settings",
        derived=True),
    Key("nodes", "top", "mapping", None, "the machines `make deploy` installs onto "
        "([deploy/README.md](deploy/README.md)); a node is its ssh target or a mapping"),
    Key("keys", "top", "mapping", None, "per key name its models and limits (`\"*\"`: every "
        "key without an entry); see [Team keys](#team-keys-models-rates-quotas-and-a-usage-"
        "ledger)"),
    # --- timeouts
    Key("connect", "timeouts", "seconds", 10.0, "TCP connect to the model server"),
    Key("first_byte", "timeouts", "seconds", 600.0, "until the first response byte: model "
        "load plus a whole unary generation"),
    Key("idle", "timeouts", "seconds", 300.0, "longest silence once bytes flow (mlx's "
        "`: keepalive` comments count)"),
    # --- models.<alias>
    Key("model", "model", "text", "required", "internal model id, sent upstream, never shown",
        derived=True),
    Key("upstream", "model", "url", "required (or `upstreams`)", "the mlx_lm.server base URL "
        "(scheme, host, port; no path)", derived=True),
    Key("upstreams", "model", "list of URLs", "`[upstream]`", "replicas of the model, instead "
        "of `upstream` (see below)", derived=True),
    Key("description", "model", "text", "", "shown on `/v1/models` and the front page",
        derived=True),
    Key("parameters", "model", "text", "", "size shown beside it (e.g. `32B`)", derived=True),
    Key("timeouts", "model", "mapping", "the top-level ones", "this model's timeouts",
        derived=True),
    Key("api_key_env", "model", "text", None, "send `Authorization: Bearer $NAME` upstream "
        "(key-protected OpenAI-compatible servers)"),
    Key("max_concurrency", "model", "count", "`--decode-concurrency` in `mlx_args`, else 32",
        "requests in flight per replica", derived=True),
    Key("max_queue", "model", "count0", 256, "requests that may wait for a slot; beyond: 429 "
        "with `Retry-After`"),
    Key("queue_timeout", "model", "seconds", 60.0, "how long a request may wait for a slot"),
    Key("warmup", "model", "flag", False, "one-token request to each replica at start, reload "
        "and return, so no user pays the model load"),
    Key("stall_after", "model", "seconds", DEFAULT_STALL_AFTER, "seconds without a byte, with "
        "requests in flight, before a replica is suspect; see [When a model server hangs]"
        "(#when-a-model-server-hangs)"),
    Key("restart", "model", "list of strings", "the node's launchd job", "argv that restarts a "
        "replica (`{alias}`, `{host}`, `{port}`, `{url}`; no shell)", derived=True),
    Key("node", "model", "text", "the node whose host is the upstream's", "the node that runs "
        "it (deploy)", derived=True),
    Key("mlx_args", "model", "texts", (), "extra `mlx_lm.server` arguments (deploy)"),
    Key("shards", "model", "list of node names", (), "a model sharded over these nodes, rank 0 "
        "first (see [A model bigger than one Mac](#a-model-bigger-than-one-mac))"),
    Key("backend", "model", "`ring` or `jaccl`", "ring", "sharded: mlx.launch's backend"),
    Key("pipeline", "model", "flag", False, "sharded: pipeline instead of tensor parallelism"),
    Key("ring_port", "model", "port ≥ 1024", RING_PORT, "sharded: the ring's first port"),
    Key("size_gb", "model", "number", None, "weights on disk, for `maclustr check`'s memory "
        "arithmetic"),
    Key("kv_gb", "model", "number", "a share of `size_gb`", "KV-cache allowance for that "
        "arithmetic", derived=True),
    # --- gateway
    Key("max_body_bytes", "gateway", "bytes", 10 * MiB, "request body cap"),
    Key("shutdown_grace", "gateway", "seconds", 30.0, "seconds in-flight requests get on "
        "SIGTERM"),
    Key("cors_origins", "gateway", "texts", (), "allowed browser origins (none: CORS off)"),
    Key("public_url", "gateway", "url", None, "the base URL the front page and "
        "`/openapi.json` show (else the Host header)"),
    Key("health_timeout", "gateway", "seconds", 2.0, "deep-health ping timeout"),
    Key("generate_timeout", "gateway", "seconds", 10.0, "one-token deadline for "
        "`?deep=generate`"),
    Key("probe_generate", "gateway", "flag", False, "the passive-health probe also asks for "
        "one token (finds wedged servers)"),
    Key("metrics", "gateway", "flag", True, "`GET /metrics` and the counting behind it (read "
        "at start)"),
    Key("metrics_public", "gateway", "flag", False, "`/metrics` without a key"),
    Key("restart_limit", "gateway", "count0", DEFAULT_RESTART_LIMIT, "restarts of a replica "
        "per hour; past it the replica stays `wedged`"),
    Key("usage_db", "gateway", "path or `false`", "`maclustr-usage.sqlite3` beside routes.yaml",
        "the usage ledger's SQLite file (`false`: none)", derived=True),
    Key("usage_retention_days", "gateway", "count", 400, "days the ledger's rows are kept"),
    # --- nodes.<name> (read by the deploy commands and `maclustr check`)
    Key("ssh", "node", "text", "required", "ssh target, `user@host`", derived=True),
    Key("host", "node", "text", "the ssh host", "another name upstream URLs use for the node",
        derived=True),
    Key("gateway", "node", "flag", "the first node", "this node runs the gateway",
        derived=True),
    Key("gateway_port", "node", "count", 9000, "the gateway's port there"),
    Key("home", "node", "text", "`/Users/<ssh user>`", "home directory (absolute)",
        derived=True),
    Key("dir", "node", "text", "`<home>/maclustr`", "code in `dir/app`, routes in `dir/conf`",
        derived=True),
    Key("venv", "node", "text", "`<dir>/venv`", "the virtualenv", derived=True),
    Key("log_dir", "node", "text", "`<home>/Library/Logs/maclustr`", "service logs",
        derived=True),
    Key("env_file", "node", "text", "`<home>/.config/maclustr/env`", "where the gateway's "
        "key lives", derived=True),
    Key("bind", "node", "text", "the upstream URL's host", "address the model servers listen "
        "on", derived=True),
    Key("env", "node", "mapping", None, "extra environment for the model servers (no secrets)"),
    Key("ips", "node", "list of addresses", "its host", "addresses the MLX ring reaches it by",
        derived=True),
    Key("rdma", "node", "mapping", None, "backend jaccl: peer node -> this node's RDMA device"),
    Key("memory_gb", "node", "number", None, "its memory, for `maclustr check`'s arithmetic"),
    Key("gpu_limit_gb", "node", "number", "3/4 of `memory_gb`", "what the GPU may hold",
        derived=True),
    # --- keys.<key name> (policy.py)
    Key("models", "keys", "list of aliases", "every alias", "the models the key may use",
        derived=True),
    Key("requests_per_minute", "keys", "count", None, "requests a minute"),
    Key("tokens_per_minute", "keys", "count", None, "tokens a minute"),
    Key("tokens_per_day", "keys", "count", None, "tokens a day (kept in the ledger)"),
    Key("max_in_flight", "keys", "count", None, "requests at once"),
    Key("admin", "keys", "flag", False, "may read `/metrics`, `/v1/usage` and in-flight figures"),
)


def keys_of(where: str) -> frozenset[str]:
    """The allowed key names of one section."""
    return frozenset(k.name for k in KEYS if k.where == where)


def key(where: str, name: str) -> Key:
    return next(k for k in KEYS if k.where == where and k.name == name)


def default_of(where: str, name: str) -> Any:
    """A key's declared default, for the dataclass fields that hold it."""
    k = key(where, name)
    assert not k.derived, f"{where}.{name} has a derived default"
    return k.default


def readme_table() -> str:
    """README's routes.yaml table, one row per key."""
    rows = ["| key | where | type | default | meaning |", "|---|---|---|---|---|"]
    rows += [f"| `{k.name}` | {WHERE[k.where]} | {k.type_text} | {k.default_text} | {k.meaning} |"
             for k in KEYS]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(readme_table(), end="")
