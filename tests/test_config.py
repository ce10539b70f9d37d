"""The routes file: the shipped table resolves as documented, and every bad file is refused
with an error naming the line and key at fault (operators fix the file from that one line)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from maclustr.config import ConfigError, GatewaySettings, Timeouts, load_routes, parse_routes

ROOT = Path(__file__).resolve().parent.parent

SHIPPED = Path(__file__).resolve().parent.parent / "routes.yaml"


def y(text: str) -> str:
    """Dedent a YAML snippet so line numbers in tests match what is written."""
    return textwrap.dedent(text).lstrip("\n")


GOOD = y("""
    models:
      a:
        model: org/model-a
        upstream: http://h1.local:8081
      b:
        model: org/model-b
        upstream: http://h1.local:8081/
""")


def err(text: str) -> ConfigError:
    """Parse `text`, expecting a ConfigError, and return it."""
    with pytest.raises(ConfigError) as info:
        parse_routes(text)
    return info.value


# --- the shipped file ---------------------------------------------------------------------


def test_shipped_routes_have_four_aliases_in_file_order() -> None:
    table = load_routes(SHIPPED)
    assert table.aliases == ("maclustr-coder", "maclustr-reasoning", "maclustr-general",
                             "maclustr-fast")


def test_shipped_routes_have_two_nodes_worth_of_distinct_upstreams() -> None:
    table = load_routes(SHIPPED)
    assert table.upstreams == ("http://studio-1.local:8081", "http://studio-1.local:8082",
                               "http://studio-2.local:8081", "http://studio-2.local:8082")
    hosts = {u.split("//")[1].split(":")[0] for u in table.upstreams}
    assert hosts == {"studio-1.local", "studio-2.local"}


def test_shipped_routes_resolve_by_alias_and_by_internal_id() -> None:
    table = load_routes(SHIPPED)
    coder = table.resolve("maclustr-coder")
    assert coder is not None
    assert coder.model == "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"
    assert coder.upstream == "http://studio-1.local:8081"
    assert coder.parameters == "30B (MoE · 3B active)"
    assert coder.description == "Coding and agent development model"
    assert table.resolve("mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit") is coder
    assert table.resolve("nope") is None
    assert table.resolve("") is None


def test_shipped_routes_use_default_timeouts_and_settings() -> None:
    table = load_routes(SHIPPED)
    assert all(r.timeouts == Timeouts() for r in table.routes)
    assert table.settings == GatewaySettings()


def test_upstreams_are_deduplicated_and_trailing_slash_stripped() -> None:
    table = parse_routes(GOOD)
    assert table.upstreams == ("http://h1.local:8081",)
    assert [r.upstream for r in table.routes] == ["http://h1.local:8081"] * 2


def test_alias_wins_over_an_internal_id_with_the_same_name() -> None:
    table = parse_routes(y("""
        models:
          x:
            model: org/x
            upstream: http://h:1
          y:
            model: org/y
            upstream: http://h:2
    """))
    assert table.resolve("x").alias == "x"  # type: ignore[union-attr]
    assert table.resolve("org/y").alias == "y"  # type: ignore[union-attr]


def test_global_timeouts_are_the_default_and_a_model_overrides_some() -> None:
    table = parse_routes(y("""
        timeouts:
          connect: 3
          idle: 50
        models:
          a:
            model: m/a
            upstream: http://h:1
            timeouts:
              idle: 7.5
          b:
            model: m/b
            upstream: http://h:2
    """))
    a, b = table.routes
    assert a.timeouts == Timeouts(connect=3.0, first_byte=600.0, idle=7.5)
    assert b.timeouts == Timeouts(connect=3.0, first_byte=600.0, idle=50.0)


def test_gateway_settings_are_read() -> None:
    table = parse_routes(y("""
        gateway:
          max_body_bytes: 2048
          shutdown_grace: 5
          cors_origins: [https://a.example, https://b.example]
          public_url: https://api.example.com/
          health_timeout: 0.5
        models:
          a:
            model: m/a
            upstream: https://h:1
    """))
    s = table.settings
    assert s.max_body_bytes == 2048
    assert s.shutdown_grace == 5.0
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.public_url == "https://api.example.com"
    assert s.health_timeout == 0.5


def test_load_routes_on_missing_file_names_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_routes("/nonexistent/routes.yaml")
    assert "/nonexistent/routes.yaml" in str(info.value)
    assert info.value.line is None


def test_load_routes_reports_path_and_line(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(y("""
        models:
          a:
            model: m/a
            upstream: ftp://h:1
    """))
    with pytest.raises(ConfigError) as info:
        load_routes(p)
    assert info.value.line == 4
    assert str(info.value).startswith(f"{p}:4: ")


# --- validation: every error names its line and key ----------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "needles"),
    [
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:1
            modles: {}
        """), 5, ["unknown key 'modles'", "top level"], id="unknown-top-level-key"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:1
                temperature: 0.2
        """), 5, ["models.a", "unknown key 'temperature'"], id="unknown-model-key"),
        pytest.param(y("""
            models:
              a:
                upstream: http://h:1
        """), 2, ["models.a", "'model'"], id="missing-model"),
        pytest.param(y("""
            models:
              a:
                model: m/a
        """), 2, ["models.a", "'upstream'"], id="missing-upstream"),
        pytest.param(y("""
            models:
              a:
        """), 2, ["models.a", "'model'", "'upstream'"], id="null-model-entry"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: ftp://h:1
        """), 4, ["models.a.upstream", "ftp://h:1"], id="bad-scheme"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: h1.local:8081
        """), 4, ["models.a.upstream"], id="no-scheme"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://:8081
        """), 4, ["models.a.upstream", "http://:8081"], id="url-without-host"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:99999
        """), 4, ["models.a.upstream", "port"], id="port-out-of-range"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:80x
        """), 4, ["models.a.upstream", "port"], id="port-not-a-number"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:1?x=1
        """), 4, ["models.a.upstream", "query"], id="url-with-query"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:1
              a:
                model: m/b
                upstream: http://h:2
        """), 5, ["duplicate key 'a'"], id="duplicate-alias"),
        pytest.param(y("""
            models:
              a:
                model: m/same
                upstream: http://h:1
              b:
                model: m/same
                upstream: http://h:2
        """), 5, ["models.b", "'m/same'", "models.a"], id="duplicate-internal-id"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:1
              b:
                model: a
                upstream: http://h:2
        """), 5, ["models.b", "'a'", "models.a"], id="internal-id-equals-other-alias"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                model: m/b
                upstream: http://h:1
        """), 4, ["models.a", "duplicate key 'model'"], id="duplicate-model-key"),
        pytest.param(y("""
            models: {}
        """), 1, ["'models' is empty"], id="empty-models"),
        pytest.param(y("""
            models:
        """), 1, ["models", "mapping"], id="null-models"),
        pytest.param(y("""
            models:
              - a
              - b
        """), 2, ["models must be a mapping"], id="models-is-a-list"),
        pytest.param(y("""
            - models
        """), 1, ["top level must be a mapping"], id="top-level-list"),
        pytest.param(y("""
            just a string
        """), 1, ["top level must be a mapping"], id="top-level-scalar"),
        pytest.param(y("""
            timeouts:
              idle: 5
        """), 1, ["missing required key 'models'"], id="no-models-key"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:1
                timeouts:
                  idle: 0
        """), 6, ["models.a.timeouts.idle", "positive"], id="zero-timeout"),
        pytest.param(y("""
            timeouts:
              connect: -1
            models:
              a:
                model: m/a
                upstream: http://h:1
        """), 2, ["timeouts.connect", "positive"], id="negative-global-timeout"),
        pytest.param(y("""
            timeouts:
              first_byte: .inf
            models:
              a:
                model: m/a
                upstream: http://h:1
        """), 2, ["timeouts.first_byte", "positive"], id="infinite-timeout"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:1
                timeouts:
                  idle: soon
        """), 6, ["models.a.timeouts.idle", "number"], id="timeout-not-a-number"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:1
                timeouts:
                  read: 5
        """), 6, ["models.a.timeouts", "unknown key 'read'"], id="unknown-timeout-key"),
        pytest.param(y("""
            gateway:
              max_body: 5
            models:
              a:
                model: m/a
                upstream: http://h:1
        """), 2, ["gateway", "unknown key 'max_body'"], id="unknown-gateway-key"),
        pytest.param(y("""
            gateway:
              max_body_bytes: -5
            models:
              a:
                model: m/a
                upstream: http://h:1
        """), 2, ["gateway.max_body_bytes", "positive"], id="bad-max-body"),
        pytest.param(y("""
            gateway:
              cors_origins: https://a.example
            models:
              a:
                model: m/a
                upstream: http://h:1
        """), 2, ["gateway.cors_origins", "list"], id="cors-not-a-list"),
        pytest.param(y("""
            gateway:
              public_url: api.example.com
            models:
              a:
                model: m/a
                upstream: http://h:1
        """), 2, ["gateway.public_url"], id="bad-public-url"),
        pytest.param(y("""
            models:
              a:
                model: ""
                upstream: http://h:1
        """), 3, ["models.a.model", "empty"], id="empty-model-id"),
        pytest.param(y("""
            models:
              a:
                model: [x]
                upstream: http://h:1
        """), 3, ["models.a.model", "string"], id="model-id-not-a-string"),
        pytest.param(y("""
            models:
              "bad alias":
                model: m/a
                upstream: http://h:1
        """), 2, ["'bad alias'", "spaces"], id="alias-with-space"),
        pytest.param(y("""
            models:
              a:
                model: m/a
                upstream: http://h:1
                mlx_args: --foo
        """), 5, ["models.a.mlx_args", "list"], id="mlx-args-not-a-list"),
    ],
)
def test_invalid_routes_are_refused_naming_line_and_key(text: str, line: int,
                                                        needles: list[str]) -> None:
    e = err(text)
    assert e.line == line, str(e)
    for needle in needles:
        assert needle in e.message, (needle, e.message)
    assert str(e).startswith(f"routes.yaml:{line}: ")


def test_empty_file_is_refused() -> None:
    for text in ("", "\n", "# only a comment\n"):
        e = err(text)
        assert "empty" in e.message
        assert e.line is None


def test_invalid_yaml_names_its_line() -> None:
    e = err(y("""
        models:
          a:
            model: m/a
            upstream: [http://h:1
    """))
    assert e.message.startswith("invalid YAML")
    assert e.line is not None and e.line >= 4


def test_invalid_yaml_bad_indentation_names_its_line() -> None:
    e = err("models:\n  a:\n    model: m/a\n   upstream: http://h:1\n")
    assert e.message.startswith("invalid YAML")
    assert e.line == 4


def test_tab_indentation_is_refused_with_a_line() -> None:
    e = err("models:\n\ta:\n")
    assert e.message.startswith("invalid YAML")
    assert e.line == 2


def test_unknown_node_name_is_refused() -> None:
    e = err(y("""
        nodes:
          studio-1: me@studio-1
        models:
          a:
            model: m/a
            upstream: http://h:1
            node: studio-9
    """))
    assert "models.a.node" in e.message
    assert "studio-9" in e.message


def test_error_message_lists_allowed_keys() -> None:
    e = err(y("""
        models:
          a:
            model: m/a
            upstream: http://h:1
            descripton: typo
    """))
    assert "description" in e.message
    assert "upstream" in e.message


def test_source_name_is_used_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse_routes("models: {}\n", "/etc/maclustr/routes.yaml")
    assert str(info.value).startswith("/etc/maclustr/routes.yaml:1: ")


# --- every key declared once (maclustr/config_keys.py) -------------------------------------


def test_readme_routes_table_is_the_declared_keys() -> None:
    """README's routes.yaml table is exactly config_keys' rendering, so no key (ring_port was
    missing) goes undocumented; `python -m maclustr.config_keys` prints the table to paste."""
    from maclustr.config_keys import readme_table

    readme = (ROOT / "README.md").read_text()
    head = "| key | where | type | default | meaning |"
    assert head in readme
    start = readme.index(head)
    shown = readme[start:readme.index("\n\n", start) + 1]
    assert shown == readme_table(), "README's routes.yaml table is stale:\n" + readme_table()


def test_declared_defaults_are_the_parsed_defaults() -> None:
    from dataclasses import fields

    from maclustr.config import GatewaySettings, Route, Timeouts
    from maclustr.config_keys import KEYS, keys_of
    from maclustr.policy import POLICY_FIELDS

    for cls, where in ((GatewaySettings, "gateway"), (Timeouts, "timeouts")):
        assert {f.name for f in fields(cls)} == keys_of(where)
    table = parse_routes("models:\n  a:\n    model: m\n    upstream: http://h:1\n")
    objects = {"gateway": table.settings, "timeouts": table.routes[0].timeouts,
               "model": table.routes[0]}
    for k in KEYS:
        if k.where in objects and not k.derived:
            got = getattr(objects[k.where], k.name)
            assert got == k.default, (k.where, k.name, got)
    assert keys_of("keys") == set(POLICY_FIELDS)
    assert {f.name for f in fields(Route)} >= keys_of("model")  # each model key is a field


@pytest.mark.parametrize(("node_yaml", "key"), [
    ("    ssh: admin@studio-1.local\n    memroy_gb: 96\n", "memroy_gb"),
    ("    ssh: admin@studio-1.local\n    gatway: true\n", "gatway"),
])
def test_a_misspelt_node_key_is_an_error_with_its_line(node_yaml: str, key: str) -> None:
    text = ("nodes:\n  studio-1:\n" + node_yaml +
            "models:\n  a:\n    model: m\n    upstream: http://studio-1.local:8081\n")
    with pytest.raises(ConfigError) as e:
        parse_routes(text, "routes.yaml")
    assert e.value.line == 4
    assert f"nodes.studio-1: unknown key '{key}'" in str(e.value)
    assert str(e.value).startswith("routes.yaml:4: ")


@pytest.mark.parametrize("url", ["http://h:8081/v1", "http://h:8081/mlx/", "https://h/x"])
def test_an_upstream_with_a_path_is_an_error_with_its_line(url: str) -> None:
    for body in (f"    upstream: {url}\n", f"    upstreams:\n      - http://g:1\n      - {url}\n"):
        with pytest.raises(ConfigError) as e:
            parse_routes("models:\n  a:\n    model: m\n" + body, "routes.yaml")
        assert "must not have a path" in str(e.value)
        assert e.value.line == 4 + body.count("\n") - 1


def test_an_upstream_with_only_a_slash_is_still_fine() -> None:
    table = parse_routes("models:\n  a:\n    model: m\n    upstream: http://h:8081/\n")
    assert table.routes[0].upstream == "http://h:8081"
