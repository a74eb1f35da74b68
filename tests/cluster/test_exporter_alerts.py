"""The exporter-down alert on a real Prometheus scraping the file_sd targets a real controller writes: it fires while
a run's rank is dead and the run goes on, and a run that finished leaves no target behind to fire it.

The rules are the committed ones with `PretrainExporterDown`'s `for:` cut from 5 minutes to 3 seconds (the test
Prometheus scrapes and evaluates every second). Scrapes are not instants: as a run ends, a rank's exporter may be
scraped down up to one interval before its controller's is, so the alert may be pending for that long; it must not
fire. The controller runs in this process on the shared simulated cluster
with the light gloo workload of the controller tests; rank 1's process exits after step 3 (the worker's fault
injection), and the restart waits long enough for Prometheus to see the dead exporters.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from prometheus_server import PrometheusServer

from cluster.metrics import remove_targets, write_targets_file
from orchestrator.errors import UserError

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "k8s" / "base" / "prometheus" / "rules.yml"
RUN = "alerting"
DOWN = f'ALERTS{{alertname="PretrainExporterDown", run="{RUN}"}}'
FIRING = f'ALERTS{{alertname="PretrainExporterDown", run="{RUN}", alertstate="firing"}}'


def test_runs_sharing_a_targets_file_replace_and_remove_only_their_own(tmp_path):
    path = tmp_path / "targets.json"
    write_targets_file(path, [{"targets": ["h:1"], "labels": {"run": "a", "role": "rank"}}])
    write_targets_file(path, [{"targets": ["h:2"], "labels": {"run": "b", "role": "rank"}}])
    write_targets_file(path, [{"targets": ["h:3"], "labels": {"run": "a", "role": "rank"}}])  # a's next attempt
    assert {g["labels"]["run"]: g["targets"] for g in json.loads(path.read_text())} == {"a": ["h:3"], "b": ["h:2"]}
    remove_targets(path, "a")
    assert [g["labels"]["run"] for g in json.loads(path.read_text())] == ["b"]
    remove_targets(path, "b")
    assert not path.exists()
    path.write_text("{not json")
    with pytest.raises(UserError, match=r"metrics.targets_file: .*targets.json is not a Prometheus file_sd list"):
        write_targets_file(path, [{"targets": ["h:1"], "labels": {"run": "a", "role": "rank"}}])
    assert path.read_text() == "{not json"


def _fast_rules(tmp_path: Path) -> Path:
    rules = yaml.safe_load(RULES.read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "PretrainExporterDown":
            rule["for"] = "3s"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout:g} s")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_exporter_down_fires_for_a_live_run_only(ray_cluster, tmp_path):
    import ray

    from orchestrator.controller import Controller
    from orchestrator.validate import parse_spec

    targets = tmp_path / "targets.json"
    spec = parse_spec({
        "name": RUN, "schedule": {"steps": 8, "warmup_steps": 0},
        "checkpoint": {"dir": str(tmp_path / "checkpoints")},
        "metrics": {"targets_file": str(targets)},
        "resources": {"num_nodes": 2, "gpus_per_node": 1, "cpus_per_rank": 0.5, "max_restarts": 1,
                      "restart_backoff_s": 12.0},
    })
    prometheus = PrometheusServer(tmp_path / "prometheus", targets, rule_files=(_fast_rules(tmp_path),))
    controller = Controller(spec, entry="tests.cluster.workloads:allreduce_steps")
    results: list = []
    ray.init(address=ray_cluster.address,
             runtime_env={"env_vars": {"PRETRAIN_TEST_EXIT": f"1:3:{tmp_path / 'exited'}"}})
    try:
        thread = threading.Thread(target=lambda: results.append(controller.run()), daemon=True)
        thread.start()
        # Rank 1 is dead and rank 0 stopped with it; the controller is up, waiting to restart them.
        _wait(lambda: prometheus.query(FIRING) or not thread.is_alive(), 120,
              "no exporter-down alert during the restart's wait")
        assert {a["metric"]["role"] for a in prometheus.query(FIRING)} == {"rank"}, prometheus.query(DOWN)
        first_attempt = {t["metric"]["instance"] for t in prometheus.query(f'up{{run="{RUN}", role="rank"}}')}
        thread.join(timeout=240)
        finished = time.monotonic()
    finally:
        ray.shutdown()
    try:
        assert results and results[0].restarts == 1 and results[0].step == 8, results
        assert not targets.exists(), targets.read_text()
        # Prometheus applies a file's change within two 5 s ticks (discovery, then scrape manager)
        _wait(lambda: not [t for t in prometheus.targets() if t["labels"].get("run") == RUN], 30,
              "Prometheus still scrapes the finished run's exporters")
        _wait(lambda: not prometheus.query(DOWN), 10, "the finished run's exporter-down alert is still pending")
        for _ in range(5):  # scrape and evaluation intervals after the end: the run's exporters are gone, quietly
            assert not prometheus.query(DOWN), prometheus.query(DOWN)
            time.sleep(1.0)
        # The first attempt's alert lasts until Prometheus drops its targets, maybe past the end; the last one's
        # exporters never fire.
        since_end = f"{int(time.monotonic() - finished)}s"
        fired = {a["metric"]["instance"] for a in prometheus.query(f"{FIRING}[{since_end}]")}
        assert fired <= first_attempt, (fired, first_attempt)
    finally:
        prometheus.stop()
