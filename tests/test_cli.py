"""The command line as an operator meets it: `check` validates and prints the alias table,
`serve` refuses at once (one stderr line) to run open or on a bad routes file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = Path(sys.executable).parent / "maclustr"


def run(*args: str, env: dict[str, str] | None = None, exe: list[str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the CLI from the repo root with a clean environment (no API key unless given)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MACLUSTR_")}
    base.update(env or {})
    cmd = (exe or [sys.executable, "-m", "maclustr"]) + list(args)
    return subprocess.run(cmd, cwd=ROOT, env=base, capture_output=True, text=True,
                          timeout=timeout, check=False)


BAD = """models:
  maclustr-coder:
    model: m/a
    upstream: http://h:1
    temprature: 0.1
"""


def test_check_on_shipped_file_prints_the_table() -> None:
    r = run("check")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ALIAS", "MODEL", "UPSTREAM", "PARAMETERS", "DESCRIPTION"]
    for alias in ("maclustr-coder", "maclustr-reasoning", "maclustr-general", "maclustr-fast"):
        assert any(line.startswith(alias + " ") for line in lines), alias
    assert "mlx-community/QwQ-32B-4bit" in r.stdout
    assert "http://studio-2.local:8082" in r.stdout
    assert lines[-1] == "routes.yaml: OK, 4 models"
    assert r.stderr == ""


def test_check_with_explicit_routes_path(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("models:\n  a:\n    model: m/a\n    upstream: http://h:1\n")
    r = run("check", "--routes", str(p))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"{p}: OK, 1 models"


def test_check_on_bad_file_names_line_and_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(BAD)
    r = run("check", "--routes", str(p))
    assert r.returncode != 0
    assert r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1
    assert f"{p}:5:" in err[0]
    assert "temprature" in err[0]
    assert "Traceback" not in r.stderr


def test_check_on_missing_file_fails_in_one_line(tmp_path: Path) -> None:
    r = run("check", "--routes", str(tmp_path / "nope.yaml"))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1
    assert "nope.yaml" in r.stderr


@pytest.mark.parametrize("key", [None, "", " ", ",", " , ,, ", "\t,\t"])
def test_serve_without_api_key_exits_at_once_with_one_line(key: str | None) -> None:
    env = {} if key is None else {"MACLUSTR_API_KEY": key}
    r = run("serve", "--port", "1", env=env, timeout=15)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "MACLUSTR_API_KEY" in lines[0]
    assert r.stdout == ""


def test_serve_with_bad_routes_file_exits_non_zero(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(BAD)
    r = run("serve", "--routes", str(p), "--port", "1", env={"MACLUSTR_API_KEY": "k1"},
            timeout=15)
    assert r.returncode != 0
    assert f"{p}:5:" in r.stderr
    assert "Traceback" not in r.stderr
    assert "k1" not in r.stderr


def test_serve_with_missing_routes_file_exits_non_zero(tmp_path: Path) -> None:
    r = run("serve", "--routes", str(tmp_path / "none.yaml"), "--port", "1",
            env={"MACLUSTR_API_KEY": "k1"}, timeout=15)
    assert r.returncode != 0
    assert "none.yaml" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_lists_the_commands() -> None:
    r = run("--help")
    assert r.returncode == 0
    assert "serve" in r.stdout and "check" in r.stdout
    r = run("serve", "--help")
    assert r.returncode == 0
    for flag in ("--routes", "--host", "--port"):
        assert flag in r.stdout
    assert "127.0.0.1" in r.stdout and "9000" in r.stdout


def test_no_command_is_a_usage_error() -> None:
    r = run()
    assert r.returncode == 2
    assert "usage:" in r.stderr


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("maclustr ")


def test_console_script_check_and_refusal() -> None:
    assert CONSOLE.exists(), f"{CONSOLE} missing: pip install -e ."
    r = run("check", exe=[str(CONSOLE)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "routes.yaml: OK, 4 models"
    r = run("serve", exe=[str(CONSOLE)], timeout=15)
    assert r.returncode != 0
    assert len(r.stderr.splitlines()) == 1
    r = run("--help", exe=[str(CONSOLE)])
    assert r.returncode == 0 and "usage: maclustr" in r.stdout


def test_readme_documents_every_serve_flag_and_environment_variable() -> None:
    """Every option `maclustr serve --help` lists, and every MACLUSTR_* variable the code reads,
    has a row in the README's serve table."""
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("`maclustr serve` (also"):readme.index("Each entry of")]
    r = run("serve", "--help")
    flags = set(re.findall(r"(--[a-z][a-z-]+)", r.stdout)) - {"--help"}
    assert {"--routes", "--host", "--port", "--log-level", "--loop",
            "--reload-interval"} <= flags
    code = "\n".join(p.read_text() for p in (ROOT / "maclustr").glob("*.py"))
    variables = set(re.findall(r"\b(MACLUSTR_[A-Z_]+)\b", code))
    assert {"MACLUSTR_API_KEY", "MACLUSTR_LOG_LEVEL"} <= variables
    missing = sorted(x for x in flags | variables if f"`{x}" not in table)
    assert not missing, f"README's serve table does not document {missing}"


@pytest.mark.parametrize("level", ["verbose", "5"])
def test_a_bad_log_level_from_the_environment_is_one_clear_line(level: str) -> None:
    """argparse checks --log-level against its choices, but not the default it takes from
    MACLUSTR_LOG_LEVEL: that must not end in a traceback."""
    r = run("serve", "--port", "1", env={"MACLUSTR_API_KEY": "k1", "MACLUSTR_LOG_LEVEL": level},
            timeout=15)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert "MACLUSTR_LOG_LEVEL" in r.stderr and level in r.stderr


def test_log_level_from_the_environment_in_any_case(tmp_path: Path) -> None:
    r = run("serve", "--routes", str(tmp_path / "none.yaml"), "--port", "1",
            env={"MACLUSTR_API_KEY": "k1", "MACLUSTR_LOG_LEVEL": "WARNING"}, timeout=15)
    assert r.returncode == 2 and "none.yaml" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_access_writer_prints_the_line_logging_would(capfd: pytest.CaptureFixture[str],
                                                     log_format: str) -> None:
    """`maclustr serve` writes access lines past the logging module (its record costs ~15 µs
    a request): the same line, the same stream."""
    import logging
    import re

    from maclustr import cli

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    handler = cli.configure_logging("INFO", log_format)
    try:
        line = '{"request_id": "r1"}' if log_format == "json" else "r1 key=k POST /v1/x"
        logging.getLogger("maclustr.access").info("%s", line)
        handler.access_writer()(line)
        handler.flush_now()
        got = capfd.readouterr().err.splitlines()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert len(got) == 2, got
    if log_format == "json":
        assert got == [line, line]
    else:
        clock = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
        assert all(re.fullmatch(clock + "INFO maclustr.access " + re.escape(line), g)
                   for g in got), got
