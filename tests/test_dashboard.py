"""deploy/grafana-dashboard.json: valid JSON Grafana imports, with the five sections the
README promises, and every query naming only series the gateway really exposes."""

from __future__ import annotations

import json
import re
from typing import Any

from conftest import ROOT, FakeMLX, Gateway, routes_yaml
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
            "info": ("_info",), "gauge": ("",)}


def queries(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


async def test_dashboard_queries_only_real_series(make_gateway: Any, fake: FakeMLX) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Health", "Latency", "Load", "Usage per key", "Failures"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    gw: Gateway = await make_gateway(routes_yaml({"maclustr-coder": fake.url}))
    ans = await gw.client.get("/metrics")
    exposed = set()
    for fam in text_string_to_metric_families(ans.body.decode()):
        exposed |= {fam.name + s for s in SUFFIXES[fam.type]}
    used = set()
    for expr in queries(dash):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        used |= set(re.findall(r"maclustr_[a-z_]+", expr))
    assert used <= exposed, used - exposed
    # every family the gateway reports is on the dashboard, one way or another
    families = {re.sub(r"_(total|bucket|count|sum|info)$", "", n) for n in exposed}
    shown = {re.sub(r"_(total|bucket|count|sum|info)$", "", n) for n in used}
    assert families - shown == set()
