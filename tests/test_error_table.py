"""One error table (issue 13): errors.py's classes carry status, type, code and meaning; the
front page, openapi.json and the README show exactly that table, and no code the gateway can
answer with is missing from it."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import maclustr
from maclustr import errors
from maclustr.config import parse_routes
from maclustr.errors import GatewayError, error_table
from maclustr.openapi import openapi_document
from maclustr.page import render_page

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "maclustr"
# Access-log / metrics outcomes that are not answers: "done" (success), and a client that left.
NOT_ANSWERS = {"done", "client_disconnected"}


def all_error_classes() -> list[type[GatewayError]]:
    for mod in pkgutil.iter_modules([str(PKG)]):
        if mod.name != "__main__":
            importlib.import_module(f"maclustr.{mod.name}")  # dialects may define their own
    out, todo = [], [GatewayError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def codes_set_in_source() -> set[str]:
    """Every string constant assigned to a `code` (class attribute, `self.code`, tuple
    assignment) anywhere in the package: a code made up outside the classes shows here."""
    found: set[str] = set()
    for path in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Assign, ast.AnnAssign)):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                pairs: list[tuple[ast.AST, ast.AST | None]] = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts, strict=False))
                for t, v in pairs:
                    name = t.id if isinstance(t, ast.Name) else (
                        t.attr if isinstance(t, ast.Attribute) else None)
                    if name == "code" and isinstance(v, ast.Constant) and isinstance(v.value, str):
                        found.add(v.value)
    return found


def test_every_class_says_what_it_means_and_is_in_the_table() -> None:
    table = {(r.status, r.code) for r in error_table()}
    for cls in all_error_classes():
        assert isinstance(cls.meaning, str) and len(cls.meaning) > 8, cls
        if "code" in vars(cls) or "status" in vars(cls):  # its own row: its own words
            assert "meaning" in vars(cls), f"{cls.__name__} has its own code but no meaning"
        assert (cls.shown_status or str(cls.status), cls.code) in table, cls


def test_every_code_in_the_source_is_in_the_table() -> None:
    documented = {r.code for r in error_table()}
    assert codes_set_in_source() - NOT_ANSWERS <= documented, (
        codes_set_in_source() - NOT_ANSWERS - documented)
    # the rows the issue named
    rows = {(r.status, r.code) for r in error_table()}
    assert {("429", "rate_limit_exceeded"), ("503", "model_unavailable"),
            ("503", "gateway_shutting_down"), ("431", "request_header_too_large"),
            ("4xx", "upstream_rejected")} <= rows
    assert "generate" in next(r.meaning for r in error_table() if r.code == "invalid_api_key")


class _Rows(HTMLParser):
    """The <tbody> rows of the table after <h2 id="errors">, as lists of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.state, self.rows, self.cell = 0, [], None  # 0 before, 1 in section, 2 in tbody
        self.rows: list[list[str]]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h2" and ("id", "errors") in attrs:
            self.state = 1
        elif self.state == 1 and tag == "tbody":
            self.state = 2
        elif self.state == 2 and tag == "tr":
            self.rows.append([])
        elif self.state == 2 and tag == "td":
            self.cell = ""

    def handle_endtag(self, tag: str) -> None:
        if self.state == 2 and tag == "td" and self.cell is not None:
            self.rows[-1].append(self.cell)
            self.cell = None
        elif self.state == 2 and tag == "tbody":
            self.state = 3

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell += data


def _table() -> Any:
    return parse_routes("models:\n  maclustr-coder:\n    model: m\n"
                        "    upstream: http://127.0.0.1:1\n", "routes.yaml")


def test_front_page_table_is_the_error_table() -> None:
    parser = _Rows()
    parser.feed(render_page(_table(), "http://127.0.0.1:9000"))
    expected = [[r.status, r.code, r.meaning.replace("`", "")] for r in error_table()]
    assert parser.rows == expected


def test_openapi_documents_every_code_and_deep_generate() -> None:
    doc = openapi_document(_table())
    desc = doc["info"]["description"]
    lines = [ln for ln in desc.splitlines() if ln.startswith("| ") and "`" in ln]
    assert lines == [f"| {r.status} | `{r.code}` | {r.meaning} |" for r in error_table()]
    ops = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    for r in error_table():
        if r.code in ("not_found", "method_not_allowed", "internal_error"):
            continue
        assert f"(`{r.code}`)" in ops[r.status.upper()]["description"], r
    health = doc["paths"]["/health"]["get"]
    assert "generate" in health["parameters"][0]["schema"]["enum"]
    assert "invalid_api_key" in health["responses"]["401"]["description"]
    assert "only as the last event" not in str(doc).lower()


def test_readme_table_is_the_error_table() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Errors"):]
    section = section[:section.index("\n### ", 5)]
    rows = [[c.strip() for c in ln.strip("|").split(" | ")]
            for ln in section.splitlines() if re.match(r"\| (\d{3}|\dxx) \|", ln)]
    assert rows == [[r.status, f"`{r.code}`", r.meaning] for r in error_table()]


def test_the_table_lives_in_errors_py_only() -> None:
    """No second copy to drift: the page and openapi import it; nothing else lists codes."""
    for name in ("page.py", "openapi.py"):
        text = (PKG / name).read_text()
        assert "error_table" in text
        assert "gateway_shutting_down" not in text and "upstream_rejected" not in text, name
    assert errors.error_table is error_table and maclustr
