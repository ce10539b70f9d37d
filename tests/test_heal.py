"""The pure rules of self-healing (heal.py, restarts.py) and their routes.yaml keys: the dead and
stall verdicts, the restart budget, the restart command and what `maclustr check` refuses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from maclustr.config import ConfigError, parse_routes
from maclustr.heal import (
    RestartBudget,
    is_dead_answer,
    is_dead_health,
    render,
    stalled,
    unknown_placeholders,
)
from maclustr.restarts import describe, output_tail, restart_argv

ROOT = Path(__file__).resolve().parent.parent


def table(text: str):  # type: ignore[no-untyped-def]
    return parse_routes(textwrap.dedent(text).lstrip("\n"))


def test_only_the_dead_thread_404_is_dead() -> None:
    assert is_dead_answer(404, "generation thread died")
    assert not is_dead_answer(404, "Repo id must be in the form 'repo_name'")  # the client's
    assert not is_dead_answer(500, "generation thread died")
    assert is_dead_health(503) and not is_dead_health(200) and not is_dead_health(404)


def test_stall_needs_requests_in_flight_and_silence_of_stall_after() -> None:
    assert stalled(1, last_byte=100.0, now=220.0, stall_after=120.0)
    assert not stalled(1, last_byte=100.0, now=219.9, stall_after=120.0)
    assert not stalled(0, last_byte=0.0, now=1e6, stall_after=120.0)  # idle is not hung


def test_budget_allows_limit_restarts_per_sliding_hour() -> None:
    b = RestartBudget(limit=3)
    for t in (0.0, 10.0, 20.0):
        assert b.allows(t)
        b.spend(t)
    assert not b.allows(3599.0)
    assert b.used(3599.0) == 3
    assert b.allows(3600.0)  # the first one left the window
    assert b.used(3600.0) == 2
    assert not RestartBudget(limit=0).allows(0.0)


def test_placeholders_are_replaced_in_each_argument_and_nothing_else() -> None:
    argv = render(["/opt/fix", "{alias}", "--at={host}:{port}", "{url}/health", "{{literal}}",
                   "$(rm -rf /)"], "coder", "http://studio-1.local:8081")
    assert argv == ("/opt/fix", "coder", "--at=studio-1.local:8081",
                    "http://studio-1.local:8081/health", "{literal}", "$(rm -rf /)")
    assert render(["x", "{port}"], "a", "http://h") == ("x", "80")


def test_unknown_placeholders_are_named() -> None:
    assert unknown_placeholders(["{alias}", "{node}", "{{ok}}", "{}"]) == ["node", "{}"]
    assert unknown_placeholders(["{alias"]) == ["{alias"]  # unbalanced


NODES = """
    nodes:
      studio-1: admin@studio-1.local
      studio-2: {ssh: admin@studio-2.local, gateway: true}
    models:
      coder:
        model: m
        upstreams: [http://studio-1.local:8081, http://studio-2.local:8081]
      fast:
        model: f
        upstream: http://10.0.0.9:8082
"""


def test_default_restart_is_the_nodes_launchd_job_over_ssh_or_local() -> None:
    t = table(NODES)
    coder = t.resolve("coder")
    assert coder is not None
    assert restart_argv(coder, "http://studio-1.local:8081", t.nodes, uid=501) == (
        "ssh", "admin@studio-1.local",
        "launchctl kickstart -k gui/$(id -u)/io.maclustr.mlx.coder")
    assert restart_argv(coder, "http://studio-2.local:8081", t.nodes, uid=501) == (
        "launchctl", "kickstart", "-k", "gui/501/io.maclustr.mlx.coder")  # the gateway's node
    fast = t.resolve("fast")
    assert fast is not None
    assert restart_argv(fast, fast.upstream, t.nodes, uid=501) is None  # on no node: none


def test_a_sharded_model_restarts_through_rank_0s_job() -> None:
    t = table("""
        nodes:
          gw: admin@gw.local
          s1: admin@s1.local
          s2: admin@s2.local
        models:
          big:
            model: m
            upstream: http://s1.local:8090
            shards: [s1, s2]
    """)
    big = t.resolve("big")
    assert big is not None
    assert restart_argv(big, big.upstream, t.nodes, uid=0) == (
        "ssh", "admin@s1.local", "launchctl kickstart -k gui/$(id -u)/io.maclustr.mlx.big")


def test_the_models_restart_wins_and_is_rendered() -> None:
    t = table(NODES.replace("model: f\n", "model: f\n        restart: [/bin/fix, '{alias}',"
                            " '{port}']\n"))
    fast = t.resolve("fast")
    assert fast is not None and fast.restart == ("/bin/fix", "{alias}", "{port}")
    assert restart_argv(fast, fast.upstream, t.nodes, 0, fast.restart) == (
        "/bin/fix", "fast", "8082")


def test_keys_are_read_with_defaults() -> None:
    t = table("""
        gateway: {restart_limit: 5}
        models:
          a: {model: m, upstream: 'http://h:1', stall_after: 7.5}
          b: {model: n, upstream: 'http://h:2'}
    """)
    a, b = t.resolve("a"), t.resolve("b")
    assert a is not None and b is not None
    assert (a.stall_after, b.stall_after, b.restart) == (7.5, 120.0, None)
    assert t.settings.restart_limit == 5
    assert table("models: {a: {model: m, upstream: 'http://h:1'}}").settings.restart_limit == 3


@pytest.mark.parametrize(("text", "line", "words"), [
    ("models:\n  a:\n    model: m\n    upstream: http://h:1\n    stall_after: 0\n", 5,
     "stall_after must be a positive number"),
    ("models:\n  a:\n    model: m\n    upstream: http://h:1\n    stall_after: soon\n", 5,
     "stall_after must be a number"),
    ("models:\n  a:\n    model: m\n    upstream: http://h:1\n    restart: []\n", 5,
     "restart must be a non-empty list of strings"),
    ("models:\n  a:\n    model: m\n    upstream: http://h:1\n    restart: kick {alias}\n", 5,
     "restart must be a non-empty list of strings"),
    ("models:\n  a:\n    model: m\n    upstream: http://h:1\n    restart:\n      - /bin/kick\n"
     "      - '{node}'\n", 7, "unknown placeholder 'node'"),
    ("models:\n  a:\n    model: m\n    upstream: http://h:1\n    restart:\n      - [x]\n", 6,
     "restart[] must be a string"),
    ("gateway:\n  restart_limit: -1\nmodels:\n  a: {model: m, upstream: 'http://h:1'}\n", 2,
     "gateway.restart_limit must be an integer >= 0"),
    ("gateway:\n  restart_limit: 2.5\nmodels:\n  a: {model: m, upstream: 'http://h:1'}\n", 2,
     "gateway.restart_limit must be an integer >= 0"),
])
def test_check_refuses_bad_keys_naming_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_routes(text)
    assert e.value.line == line and words in e.value.message, str(e.value)


def test_maclustr_check_names_file_and_line_of_an_unknown_placeholder(tmp_path: Path) -> None:
    f = tmp_path / "routes.yaml"
    f.write_text("models:\n  a:\n    model: m\n    upstream: http://h:1\n"
                 "    restart: [/bin/kick, '{hostname}']\n")
    p = subprocess.run([sys.executable, "-m", "maclustr", "check", "--routes", str(f)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode != 0
    assert f"{f}:5" in p.stderr and "unknown placeholder 'hostname'" in p.stderr, p.stderr


def test_log_words_and_output_tail_hide_secrets() -> None:
    assert describe(("ssh", "a@b", "launchctl kickstart -k x")) == \
        "ssh a@b 'launchctl kickstart -k x'"
    out = output_tail(b"x" * 1000 + b"\nkey sk-secret-1 failed\n", ["sk-secret-1"], limit=20)
    assert out == "xxxxx key *** failed" and len(out) <= 20
