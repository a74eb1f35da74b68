"""Exporters: names and labels per the contract, ports, the file_sd targets file; scraped over real HTTP."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import statistics
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import metrics as m
from orchestrator.validate import parse_spec
from parallel.callbacks import CheckpointStats, EvalStats, StepStats

# The series DESIGN.md promises (its "Metrics" contract).
DESIGN_NAMES = {
    "pretrain_step", "pretrain_loss", "pretrain_tokens_total", "pretrain_tokens_per_second", "pretrain_mfu_ratio",
    "pretrain_step_duration_seconds", "pretrain_grad_norm", "pretrain_learning_rate", "pretrain_gpu_memory_bytes",
    "pretrain_checkpoint_duration_seconds", "pretrain_restarts_total", "pretrain_last_step_timestamp_seconds",
}


def scrape(target: str) -> dict[str, list[tuple[dict, float]]]:
    """{sample name: [(labels, value)]} as Prometheus would read them from the exporter."""
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def step_stats(step: int, rank: int, **changes) -> StepStats:
    values = dict(step=step, loss=2.5, lr=1e-3, grad_norm=0.7, tokens=4096, step_seconds=0.5, tokens_per_second=8192.0,
                  mfu=0.31, memory_allocated_bytes=1 << 20, memory_peak_bytes=3 << 20, total_tokens=4096 * step,
                  rank=rank, world_size=2)
    values.update(changes)
    return StepStats(**values)


@pytest.fixture
def exporters():
    started = []
    yield started
    for exporter in started:
        exporter.close()


def test_catalogue_follows_the_contract():
    names = {metric.name for metric in m.CATALOGUE}
    assert names >= DESIGN_NAMES
    assert len(names) == len(m.CATALOGUE)
    for metric in m.CATALOGUE:
        assert metric.name.startswith("pretrain_")
        assert "job" not in metric.labels, f"{metric.name}: Prometheus renames a `job` label to exported_job"
        assert "run" in metric.labels
        assert (metric.kind == "counter") == metric.name.endswith("_total"), metric.name
        assert not metric.name.endswith(("_ms", "_milliseconds", "_mb", "_gb", "_percent")), "base units only"


def test_rank_exporters_publish_per_rank_and_run_level_series(exporters, tmp_path):
    rank0 = m.RankExporter("r", 0, node="n0", host="127.0.0.1", checkpoint_every=50)
    rank1 = m.RankExporter("r", 1, node="n1", local_rank=1, host="127.0.0.1")
    exporters += [rank0, rank1]
    for exporter in (rank0, rank1):
        exporter.on_train_start(0, exporter.rank)
        exporter.on_step(step_stats(1, exporter.rank, step_seconds=0.5 + exporter.rank))
    checkpoint = tmp_path / "step_1"
    checkpoint.mkdir()
    (checkpoint / "model.pt").write_bytes(b"x" * 1000)
    (checkpoint / "manifest.json").write_bytes(b"{}")
    rank0.on_checkpoint(CheckpointStats(step=1, path=str(checkpoint), seconds=1.25))
    rank0.on_eval(EvalStats(step=1, loss=2.75, batches=4, seconds=0.3))

    zero, one = scrape(rank0.target), scrape(rank1.target)
    assert zero["pretrain_step_duration_seconds"] == [({"run": "r", "rank": "0", "node": "n0"}, 0.5)]
    assert one["pretrain_step_duration_seconds"] == [({"run": "r", "rank": "1", "node": "n1"}, 1.5)]
    assert one["pretrain_tokens_per_second"][0][1] == 4096.0  # its share: 8192 tokens/s over 2 ranks
    assert one["pretrain_gpu_memory_bytes"][0][1] == 3 << 20
    assert zero["pretrain_loss"] == [({"run": "r"}, 2.5)]
    assert zero["pretrain_eval_loss"] == [({"run": "r"}, 2.75)]
    assert zero["pretrain_tokens_total"] == [({"run": "r"}, 4096.0)]
    assert zero["pretrain_checkpoint_duration_seconds"] == [({"run": "r", "operation": "save"}, 1.25)]
    assert zero["pretrain_checkpoint_bytes"] == [({"run": "r", "operation": "save"}, 1002.0)]
    assert zero["pretrain_checkpoint_step"] == [({"run": "r"}, 1.0)]
    assert zero["pretrain_checkpoint_interval_steps"] == [({"run": "r"}, 50.0)]
    assert "pretrain_loss" not in one and "pretrain_tokens_total" not in one, "run-level series come from rank 0"
    assert abs(zero["pretrain_last_step_timestamp_seconds"][0][1] - time.time()) < 60


def test_moe_routing_is_published_per_layer_under_every_loggers_names(exporters):
    from parallel.callbacks import MoELayerStats
    from parallel.trackers import step_scalars

    layers = [MoELayerStats(1, 90.0, 64.0, 40.0, 1.5, 0.0, 1.04), MoELayerStats(3, 120.0, 64.0, 8.0, 0.9, 6.0, 1.6)]
    stage = m.RankExporter("r", 2, node="n1", host="127.0.0.1")  # the first rank of a pipeline stage
    exporters.append(stage)
    stage.on_step(step_stats(1, 2, moe=layers))
    scraped = scrape(stage.target)
    assert set(m.MOE_SERIES) == set(layers[0].series()) <= {metric.name for metric in m.CATALOGUE}
    for name in m.MOE_SERIES:
        assert scraped[name] == [({"run": "r", "layer": str(layer.layer)}, layer.series()[name]) for layer in layers]
    assert scraped["pretrain_moe_expert_load_max_tokens"][1][1] == 120.0
    scalars = step_scalars(step_stats(1, 0, moe=layers))
    assert {k: v for k, v in scalars.items() if k.startswith("pretrain_moe_")} == {
        f"{name}/{layer.layer}": value for layer in layers for name, value in layer.series().items()}


def test_a_nan_loss_is_published_as_nan(exporters):
    rank0 = m.RankExporter("r", 0, host="127.0.0.1")
    exporters.append(rank0)
    rank0.on_step(step_stats(3, 0, loss=float("nan")))
    assert math.isnan(scrape(rank0.target)["pretrain_loss"][0][1])


def test_fixed_ports_place_the_controller_then_the_ranks(exporters):
    base = _free_port_block(4)
    controller = m.ControllerExporter("r", host="127.0.0.1", port=base)
    ranks = [m.RankExporter("r", i, local_rank=i, host="127.0.0.1", port=base) for i in range(2)]
    exporters += [controller, *ranks]
    assert [controller.exporter.port] + [r.exporter.port for r in ranks] == [base, base + 1, base + 2]


def test_port_zero_picks_distinct_free_ports(exporters):
    ranks = [m.RankExporter("r", i, local_rank=i, host="127.0.0.1", port=0) for i in range(3)]
    exporters += ranks
    assert len({r.exporter.port for r in ranks}) == 3
    assert all(r.exporter.port > 0 for r in ranks)


def test_exporters_bind_the_node_address_unless_metrics_host_says_otherwise(exporters):
    node = m.RankExporter("r", 0, advertise_host="127.0.0.1")  # a rank: Ray's node IP is what it is advertised at
    everywhere = m.RankExporter("r", 1, local_rank=1, host="0.0.0.0", advertise_host="127.0.0.1")
    outside_ray = m.ControllerExporter("r")  # no Ray in this process: the address of the route out
    exporters += [node, everywhere, outside_ray]
    assert node.exporter._server.server_address[0] == "127.0.0.1"
    assert everywhere.exporter._server.server_address[0] == "0.0.0.0"
    assert outside_ray.exporter._server.server_address[0] == m.node_address() == outside_ray.target.split(":")[0]
    scrape(node.target)
    scrape(outside_ray.target)
    if m.node_address() != "127.0.0.1":  # a machine with a network: the node-bound exporter is not on its other address
        with pytest.raises(OSError):
            socket.create_connection((m.node_address(), node.exporter.port), timeout=2).close()


def test_a_taken_port_names_the_setting_to_change(exporters):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(m.MetricsPortError, match=rf"metrics.port: the controller cannot listen on 127.0.0.1:{port}"
                           r" .*choose a free metrics.port, or 0"):
            m.ControllerExporter("r", host="127.0.0.1", port=port)


@pytest.mark.parametrize("ranks", [2, 3, 4, 7, 64])
def test_straggler_ratio_is_over_the_median_of_the_other_ranks(ranks):
    times = {r: random.Random(ranks * 1000 + r).uniform(0.5, 3.0) for r in range(ranks)}
    times[ranks - 1] = times[0]  # a tie must not shift the others' median
    expected = {r: t / statistics.median(v for o, v in times.items() if o != r) for r, t in times.items()}
    assert m.straggler_ratios(times) == pytest.approx(expected)


def test_controller_exports_restarts_stragglers_and_writes_targets(exporters, tmp_path):
    spec = parse_spec({"name": "r", "metrics": {"host": "127.0.0.1"}, "resources": {"straggler_factor": 1.4}})
    controller = m.ControllerExporter.from_spec(spec, restarts=1)
    exporters.append(controller)
    controller.record_restart(ranks=4)
    ratios = controller.set_step_times({0: ("n0", 1.0), 1: ("n0", 1.0), 2: ("n1", 1.1), 3: ("n1", 2.0)})
    assert ratios == pytest.approx({0: 1 / 1.1, 1: 1 / 1.1, 2: 1.1, 3: 2.0})  # each over the others' median
    samples = scrape(controller.target)
    assert samples["pretrain_restarts_total"] == [({"run": "r"}, 2.0)]
    assert samples["pretrain_ranks"] == [({"run": "r"}, 4.0)]
    assert samples["pretrain_straggler_threshold_ratio"] == [({"run": "r"}, 1.4)]
    straggler = {s[0]["rank"]: s for s in samples["pretrain_straggler_ratio"]}["3"]
    assert straggler[0] == {"run": "r", "rank": "3", "node": "n1"} and straggler[1] == pytest.approx(2.0)

    path = tmp_path / "sd" / "targets.json"
    controller.write_targets(path, ["127.0.0.1:9502", "127.0.0.1:9501"])
    controller.write_targets(path, ["127.0.0.1:9502", "127.0.0.1:9501", "127.0.0.1:9503"])
    groups = json.loads(path.read_text())
    assert groups == [
        {"targets": [controller.target], "labels": {"run": "r", "role": "controller"}},
        {"targets": ["127.0.0.1:9501", "127.0.0.1:9502", "127.0.0.1:9503"], "labels": {"run": "r", "role": "rank"}},
    ]
    assert os.listdir(path.parent) == ["targets.json"], "the temporary file of the atomic write is gone"


def test_default_targets_path():
    assert m.default_targets_path("/x/t.json", "/ckpt/run/checkpoints", "run") == "/x/t.json"
    assert m.default_targets_path("", "/data/runs/a/checkpoints", "a") == "/data/runs/a/targets.json"
    assert m.default_targets_path("", "s3://bucket/a", "a") == os.path.join("runs", "a", "targets.json")


def test_dataprep_exporter_reads_counters_at_scrape_time(exporters):
    totals = {"documents_in": 10, "documents_out": 7, "bytes_in": 5000,
              "removed": {"exact_duplicate": 2, "too_short": 1}}
    dataprep = m.DataprepExporter("prep", poll=lambda: {"filter": totals}, host="127.0.0.1")
    exporters.append(dataprep)
    dataprep.publish("tokenize", {"documents_in": 7, "tokens_out": 12345})
    samples = scrape(dataprep.target)
    assert ({"run": "prep", "stage": "filter"}, 10.0) in samples["pretrain_dataprep_input_documents_total"]
    assert ({"run": "prep", "stage": "tokenize"}, 12345.0) in samples["pretrain_dataprep_output_tokens_total"]
    removed = {s[0]["rule"]: s[1] for s in samples["pretrain_dataprep_removed_documents_total"]}
    assert removed == {"exact_duplicate": 2.0, "too_short": 1.0}
    totals["documents_in"] = 25
    polled = scrape(dataprep.target)["pretrain_dataprep_input_documents_total"]
    assert ({"run": "prep", "stage": "filter"}, 25.0) in polled
    with pytest.raises(ValueError, match=r"unknown dataprep counts \['docs'\]; allowed: .*documents_in"):
        dataprep.publish("x", {"docs": 1})


def _free_port_block(size: int) -> int:
    """A base port with `size` free ports after it (checked by binding them)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no block of free ports")


def test_prep_stats_become_per_stage_counts():
    snapshot = {"stage": "pack", "counters": {
        "docs_in": 100, "bytes_in": 40000, "docs_kept": 80, "removed_exact_duplicate": 12, "removed_gopher_quality": 8,
        "tasks_done": 3, "train_tokens": 9000, "val_tokens": 1000, "train_rows": 40}}
    assert m.prep_stage_counts(snapshot) == {
        "ingest": {"documents_in": 100, "bytes_in": 40000},
        "select": {"documents_in": 100, "documents_out": 80,
                   "removed": {"exact_duplicate": 12, "gopher_quality": 8}},
        "pack": {"tokens_out": 10000},
    }
    assert m.prep_stage_counts({"stage": "starting", "counters": {}}) == {}
