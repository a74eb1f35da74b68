"""Grafana dashboards: the JSON has what Grafana needs, every expression parses, and names exist where they come from.

Whether each expression returns data from a real run is checked against a real Prometheus in
test_metrics_prometheus.py; here: structure, PromQL syntax (promtool) and the DCGM field names.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster import metrics as m
from cluster.metrics_dashboards import DASHBOARDS, GPUS, GRID_WIDTH, build_dashboard, panel_expressions

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "k8s" / "base" / "grafana"
DCGM_FIELDS = {
    line.strip() for line in Path(__file__).with_name("dcgm_fields.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}
METRIC_NAME = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
GRAFANA_VARIABLES = {"$run": "r", "$node": ".+", "$__rate_interval": "1m"}


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d.uid)
def test_committed_json_is_generated(dashboard):
    path = COMMITTED / f"{dashboard.uid}.json"
    assert json.loads(path.read_text()) == build_dashboard(dashboard), (
        f"{path} is stale: regenerate with `make k8s`")


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d.uid)
def test_dashboard_has_what_grafana_needs(dashboard):
    model = json.loads((COMMITTED / f"{dashboard.uid}.json").read_text())
    assert model["uid"] == dashboard.uid and len(model["uid"]) <= 40
    assert model["title"] and isinstance(model["schemaVersion"], int)
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "run" in variables
    for name, variable in variables.items():
        if name != "datasource":
            assert variable["type"] == "query" and variable["query"]["query"].startswith("label_values(")
    ids, cells = set(), set()
    for panel in model["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        assert panel["type"] in {"timeseries", "stat", "bargauge"} and panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y"))
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= GRID_WIDTH
        xs, ys = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        covered = {(x, y) for x in xs for y in ys}
        assert not covered & cells, f"panel {panel['title']!r} overlaps another"
        cells |= covered
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"] and target["refId"] and target["datasource"] == panel["datasource"]
            assert "$run" in target["expr"], f"{panel['title']!r} ignores the run variable"


def test_training_and_gpu_dashboards_select_by_node():
    for dashboard in DASHBOARDS[:2]:
        model = build_dashboard(dashboard)
        assert {"run", "node"} <= {v["name"] for v in model["templating"]["list"]}
        assert any("$node" in expr for _, expr in panel_expressions(model))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: run `make tools`")
def test_every_expression_parses(tmp_path):
    rules = [
        {"record": f"panel:{dashboard.uid.replace('-', '_')}:{i}", "expr": substitute(expr)}
        for dashboard in DASHBOARDS
        for i, (_, expr) in enumerate(panel_expressions(build_dashboard(dashboard)))
    ]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_series_names_exist_where_they_come_from():
    ours = {metric.name for metric in m.CATALOGUE} | {"up"}
    for dashboard in DASHBOARDS:
        for title, expr in panel_expressions(build_dashboard(dashboard)):
            names = set(METRIC_NAME.findall(expr)) - {"by", "on"}
            assert names, f"{title!r}: no metric selector in {expr}"
            allowed = DCGM_FIELDS if dashboard is GPUS else ours
            assert names <= allowed, f"{dashboard.uid} / {title!r}: unknown series {sorted(names - allowed)}"


def test_gpu_dashboard_covers_the_dcgm_essentials():
    used = {name for _, expr in panel_expressions(build_dashboard(GPUS)) for name in METRIC_NAME.findall(expr)}
    assert {"DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_DEV_FB_USED",
            "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_XID_ERRORS"} <= used
