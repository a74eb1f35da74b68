"""A mixture of experts balanced by the auxiliary-loss-free bias, as a real Prometheus sees it.

A small MoE (dim 64, 8 experts, top-2, sigmoid scores as DeepSeek-V3 pairs with the bias) trains 300 CPU steps on
real shards in this process, its rank exporter scraped by a real Prometheus every second. Over the second half of
the run no expert of any MoE layer gets twice the even share of a step's token copies (the busiest expert's load
over the mean stays under 2) and none goes without, as the series say; the training dashboard's MoE panels return
those series, and the collapsed-router alert rule evaluates without firing. The same model without balancing to
speak of sends most tokens to two experts, so the check can fail.

The bias moves 3e-3 a step (the default 1e-3 suits runs of many thousand steps: here the router, learning at
lr 1e-3, concentrates within 25 steps and the bias needs ~150 to undo it); two micro-batches a step (512 tokens)
keep the per-step counts from being mostly noise.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_server import PrometheusServer

from cluster.metrics import RankExporter, write_targets_file
from cluster.metrics_dashboards import TRAINING, build_dashboard, panel_expressions
from orchestrator.validate import parse_spec
from parallel.callbacks import BaseCallback, StepStats, read_history
from parallel.launch import RankEnv
from parallel.train import run
from tests.shards import write_shards

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "k8s" / "base" / "prometheus" / "rules.yml"
RUN = "moe-balance"
STEPS = 300
EXPERTS = 8

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class StepClock(BaseCallback):
    """When each step was published (wall clock, as Prometheus stamps its scrapes)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def on_step(self, stats: StepStats) -> None:
        self.at[stats.step] = time.time()


def train(shards: Path, out: Path, callbacks: list, steps: int = STEPS, **moe) -> dict:
    spec = parse_spec({
        "name": RUN,
        "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 64,
                  "moe": {"num_experts": EXPERTS, "top_k": 2, "score": "sigmoid", "balance": "aux_free",
                          "bias_update_rate": 3e-3, **moe}},
        "data": {"path": str(shards), "seq_len": 32, "prefetch": 0},
        "parallel": {"backend": "native", "micro_batch_size": 8, "grad_accum": 2, "precision": "fp32"},
        "optim": {"lr": 1e-3, "min_lr": 1e-4},
        "schedule": {"steps": steps, "warmup_steps": 10, "eval_every": 0, "log_every": 1000},
        "checkpoint": {"dir": str(out), "every": 0, "async_save": False},
        "resources": {"device": "cpu", "gpus_per_node": 1},
    }, require_data=True)
    run(spec, RankEnv(master_port=0), callbacks=callbacks)
    return read_history(str(out / "history.jsonl"))


def query(prometheus: PrometheusServer, expr: str, at: float) -> list[dict]:
    """The instant vector `expr` evaluates to at Unix time `at` (the exporter is gone once the run has ended)."""
    url = f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["data"]["result"]


def loads(history: dict, first: int) -> list[list[tuple[float, float]]]:
    """Per step from `first` on, each layer's (busiest, least loaded) expert over the even share (history.jsonl)."""
    return [[(layer["max_load"] / layer["mean_load"], layer["min_load"] / layer["mean_load"])
             for layer in record["moe"]] for record in history["step"][first - 1:]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("moe") / "shards", seq_len=32, rows=1200)


def test_the_bias_keeps_every_expert_within_twice_the_even_share(shards, tmp_path):
    exporter = RankExporter(RUN, 0, host="127.0.0.1")
    targets = tmp_path / "targets.json"
    write_targets_file(targets, [{"targets": [exporter.target], "labels": {"run": RUN, "role": "rank"}}])
    prometheus = PrometheusServer(tmp_path / "prometheus", targets, rule_files=(RULES,))
    clock = StepClock()
    try:
        deadline = time.monotonic() + 60  # the run takes seconds: start it once Prometheus scrapes its exporter
        while not prometheus.query(f'up{{run="{RUN}"}} == 1') and time.monotonic() < deadline:
            time.sleep(0.5)
        history = train(shards, tmp_path / "balanced", [exporter, clock])
        half, end = clock.at[STEPS // 2], clock.at[STEPS]
        window = f"[{int(end - half)}s:1s]"
        ratio = f"pretrain_moe_expert_load_{{}}_tokens{{{{run=\"{RUN}\"}}}} / " \
                f"pretrain_moe_expert_load_mean_tokens{{{{run=\"{RUN}\"}}}}"
        # Of the scrapes since step 150 only: the window's first point may see a scrape from before it.
        late = f' and on (run) pretrain_step{{run="{RUN}"}} >= {STEPS // 2}'
        busiest = query(prometheus, f"max_over_time(({ratio.format('max')}{late}){window})", end)
        least = query(prometheus, f"min_over_time(({ratio.format('min')}{late}){window})", end)
        assert sorted(s["metric"]["layer"] for s in busiest) == ["0", "1"]
        assert all(1 < float(s["value"][1]) < 2 for s in busiest), busiest
        assert all(0 < float(s["value"][1]) < 1 for s in least), least
        scrapes = query(prometheus, f'count_over_time(pretrain_moe_expert_load_max_tokens{{run="{RUN}"}}{window})',
                        end)
        assert all(float(s["value"][1]) >= 2 for s in scrapes), scrapes  # seen repeatedly, not once by luck

        panels = [(title, expr.replace("$run", RUN)) for title, expr in panel_expressions(build_dashboard(TRAINING))
                  if "pretrain_moe_" in expr]
        assert len(panels) >= 4
        for title, expr in panels:
            assert query(prometheus, expr, end), f"{title}: no series for {expr}"
        assert not query(prometheus, f'ALERTS{{alertname="PretrainMoERouterCollapsed", run="{RUN}"}}', end)
    finally:
        prometheus.stop()
    # history.jsonl keeps what the exporter served, step by step
    assert all(busiest < 2 and least > 0 for step in loads(history, STEPS // 2) for busiest, least in step)

    # Not vacuous: with no balancing to speak of (the validator refuses a strength of 0) two experts of a layer take
    # most tokens from the first tens of steps on.
    unbalanced = train(shards, tmp_path / "unbalanced", [], steps=100, balance="aux_loss", aux_loss_coef=1e-9)
    assert all(max(busiest for busiest, _ in step) >= 2 for step in loads(unbalanced, 50))
