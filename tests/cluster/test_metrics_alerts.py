"""The alert rules: promtool accepts them, and a promtool unit test fires every one of them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.metrics_alerts import ALERTS, build_prometheus_rule, build_rules

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "k8s" / "base" / "prometheus" / "rules.yml"
PROMETHEUS_RULE = REPO / "k8s" / "base" / "prometheus" / "prometheusrule.yaml"
UNIT_TESTS = Path(__file__).with_name("prometheus_alerts_test.yml")

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: run `make tools`")


def test_committed_rules_are_the_generated_ones():
    assert yaml.safe_load(RULES.read_text()) == build_rules()
    committed = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert committed["spec"] == build_rules()
    assert committed["kind"] == build_prometheus_rule()["kind"] == "PrometheusRule"


def test_promtool_checks_the_rules(tmp_path):
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout
    # The PrometheusRule's spec is a rules file too.
    spec = tmp_path / "prometheusrule-spec.yml"
    spec.write_text(yaml.safe_dump(yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]))
    result = subprocess.run(["promtool", "check", "rules", str(spec)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_fire_every_alert():
    result = subprocess.run(["promtool", "test", "rules", str(UNIT_TESTS)], capture_output=True, text=True,
                            cwd=UNIT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    fired = {
        case["alertname"]
        for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for case in group["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == {a.name for a in ALERTS}, "every alert needs a promtool test case that fires it"


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests are not vacuous: a rule with a wrong threshold fails them."""
    broken = build_rules()
    for rule in broken["groups"][0]["rules"]:
        if rule["alert"] == "PretrainStraggler":
            rule["for"] = "30m"
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(broken))
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(rules)]
    (tmp_path / "t.yml").write_text(yaml.safe_dump(tests, allow_unicode=True))
    result = subprocess.run(["promtool", "test", "rules", "t.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert "alertname: PretrainStraggler" in result.stdout + result.stderr
