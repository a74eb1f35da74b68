"""End to end: a real Prometheus scrapes a real CPU training run and a real prep run; every dashboard expression
returns series, and the alert rules evaluate cleanly on the live data.

The training run goes through the whole path a user's does: `pretrain submit` to a Ray cluster (the shared
simulated two-node one), the controller's exporter and one exporter per rank, the file_sd targets file the
controller writes, Prometheus discovering it. DCGM panels need GPUs and are checked in test_metrics_dashboards.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_server import PrometheusServer

from cluster.metrics_dashboards import DATAPREP, TRAINING, build_dashboard, panel_expressions

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "k8s" / "base" / "prometheus" / "rules.yml"
RUN = "metrics-e2e"
GRAFANA_VARIABLES = {"$run": RUN, "$node": ".+", "$__rate_interval": "1m"}

pytestmark = [pytest.mark.slow]


def expressions(dashboard) -> list[tuple[str, str]]:
    out = []
    for title, expr in panel_expressions(build_dashboard(dashboard)):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        out.append((title, expr))
    return out


def wait_for_series(prometheus: PrometheusServer, pending: list[tuple[str, str]], alive: Callable[[], bool],
                    timeout: float) -> list[tuple[str, str]]:
    """Query every expression until each has returned series; return those that never did."""
    pending = list(pending)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline and alive():
        pending = [(title, expr) for title, expr in pending if not prometheus.query(expr)]
        if pending:
            time.sleep(1.0)
    return pending


def assert_rules_evaluate(prometheus: PrometheusServer) -> None:
    """The alert rules run on the live series without errors, and none fires for a healthy run."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{prometheus.url}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(yaml.safe_load(RULES.read_text())["groups"][0]["rules"])
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = prometheus.query(f'ALERTS{{alertstate="firing", run="{RUN}"}}')
    assert not firing, firing


@pytest.mark.xdist_group("ray")
def test_every_training_panel_returns_series_from_a_real_run(ray_cluster, tmp_path):
    from cluster import submission
    from orchestrator.validate import parse_spec
    from tests.shards import write_shards

    targets = tmp_path / "targets.json"
    spec = parse_spec({
        "name": RUN,
        "model": {"dim": 64, "n_layers": 2, "n_heads": 2, "multiple_of": 32},
        "data": {"path": str(write_shards(tmp_path / "shards", seq_len=64, rows=256)), "seq_len": 64},
        "parallel": {"precision": "fp32", "micro_batch_size": 2, "zero_stage": 1},
        "schedule": {"steps": 500, "warmup_steps": 2, "eval_every": 3, "eval_batches": 1, "log_every": 50},
        "checkpoint": {"dir": str(tmp_path / "checkpoints"), "every": 3, "keep_last": 2},
        "metrics": {"host": "127.0.0.1", "targets_file": str(targets)},
        "resources": {"num_nodes": 2, "gpus_per_node": 1, "cpus_per_rank": 0.5, "hang_timeout_s": 120},
    })
    prometheus = PrometheusServer(tmp_path / "prometheus", targets, rule_files=(RULES,))
    job = submission.submit(ray_cluster.jobs_url, spec)

    def running() -> bool:
        return submission.status_name(submission.job_info(ray_cluster.jobs_url, job)) in ("PENDING", "RUNNING")

    try:
        # MFU is exported only where the device's peak FLOP/s is known: not on this CPU run; downstream scores only
        # where the spec names eval.tasks: not here; routing only for a mixture of experts (test_metrics_moe.py).
        panels = [(title, expr) for title, expr in expressions(TRAINING)
                  if not any(name in expr for name in ("pretrain_mfu_ratio", "pretrain_eval_score", "pretrain_moe_"))]
        missing = wait_for_series(prometheus, panels, running, timeout=300)
        logs = submission.logs(ray_cluster.jobs_url, job)
        assert not missing, f"panels without data: {missing}\n--- job log (tail) ---\n{logs[-4000:]}"
        roles = {t["labels"]["role"] for t in prometheus.targets() if t["health"] == "up"}
        assert roles == {"controller", "rank"}
        ranks = prometheus.query(f'pretrain_step_duration_seconds{{run="{RUN}"}}')
        assert sorted(s["metric"]["rank"] for s in ranks) == ["0", "1"]
        loss = float(prometheus.query(f'pretrain_loss{{run="{RUN}"}}')[0]["value"][1])
        assert 0 < loss < 10, loss
        assert_rules_evaluate(prometheus)
        # A stopped run takes its exporters out of the targets file: nothing is left for Prometheus to find down.
        submission.stop(ray_cluster.jobs_url, job)
        deadline = time.monotonic() + 60
        while running() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not targets.exists(), targets.read_text()
    finally:
        if running():
            submission.stop(ray_cluster.jobs_url, job)
        prometheus.stop()


@pytest.mark.xdist_group("ray")
def test_every_dataprep_panel_returns_series_from_a_real_prep_run(ray_cluster, demo_corpus, tmp_path):
    from cluster.metrics import DataprepExporter, prep_stage_counts
    from dataprep.config import parse_prep_config
    from dataprep.pipeline import run_prep
    from dataprep.stats import PrepStats

    config = parse_prep_config({
        "name": RUN, "output": str(tmp_path / "shards"), "seq_len": 64, "rows_per_shard": 256,
        # The same file as two sources: the second copy is removed as exact duplicates (a removal rule to see).
        "sources": {"fortunes": {"path": str(demo_corpus / "fortunes.jsonl.gz")},
                    "fortunes_again": {"path": str(demo_corpus / "fortunes.jsonl.gz"), "priority": 1}},
        "tokenizer": {"vocab_size": 300, "sample_bytes": 20_000},
    })
    stats = PrepStats()
    exporter = DataprepExporter(RUN, poll=lambda: prep_stage_counts(stats.snapshot()), host="127.0.0.1")
    targets = tmp_path / "targets.json"
    from cluster.metrics import write_targets_file

    write_targets_file(targets, [{"targets": [exporter.target], "labels": {"run": RUN, "role": "dataprep"}}])
    prometheus = PrometheusServer(tmp_path / "prometheus", targets)
    try:
        report = run_prep(config, address=ray_cluster.address, stats=stats, progress=False)
        # The exporter outlives the run, as the prep command's does, so its final totals stay scrapable.
        missing = wait_for_series(prometheus, expressions(DATAPREP), lambda: True, timeout=60)
        assert not missing, f"panels without data: {missing}"
        removed = prometheus.query(f'sum(pretrain_dataprep_removed_documents_total{{run="{RUN}"}})')
        kept = prometheus.query(f'pretrain_dataprep_output_documents_total{{run="{RUN}", stage="select"}}')
        read = prometheus.query(f'pretrain_dataprep_input_documents_total{{run="{RUN}", stage="ingest"}}')
        assert float(read[0]["value"][1]) == float(kept[0]["value"][1]) + float(removed[0]["value"][1]) > 0
        assert report
    finally:
        prometheus.stop()
        exporter.close()
