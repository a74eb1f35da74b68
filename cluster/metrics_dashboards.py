"""Grafana dashboards of a run (training, GPUs, dataprep), built from the metric catalogue in `cluster.metrics`.

A panel is a title, a unit and PromQL expressions; the layout, datasource wiring and template variables are filled in
here, so the committed JSON under `k8s/grafana/` is output, never edited by hand (`pretrain k8s render` writes it).
Every expression filters on `$run` (and `$node` where the series has one); the tests substitute those variables and
evaluate each expression against a real Prometheus scraping a real run.

GPU panels read NVIDIA's dcgm-exporter. Its default counters leave `DCGM_FI_PROF_SM_ACTIVE` commented out: enable it
in the exporter's counters CSV to fill that panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster import metrics as m

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'run=~"$run"'
RANK = 'run=~"$run", node=~"$node"'
GRID_WIDTH = 24


@dataclass(frozen=True)
class Panel:
    """A chart: its PromQL `targets` are (expression, legend) pairs; `width` is in Grafana's 24-column grid."""

    title: str
    targets: tuple[tuple[str, str], ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    description: str = ""


RUN_VARIABLE = ("run", f"label_values({m.STEP.name}, run)")
NODE_VARIABLE = ("node", f'label_values({m.STEP.name}{{{RUN}}}, node)')


@dataclass(frozen=True)
class Dashboard:
    """A dashboard: its panels, laid out in order, and its template variables as (name, label_values query)."""

    uid: str
    title: str
    panels: tuple[Panel, ...]
    variables: tuple[tuple[str, str], ...] = (RUN_VARIABLE, NODE_VARIABLE)


def _by_run(metric: m.Metric, selector: str = RUN, how: str = "max") -> str:
    return f"{how} by (run) ({metric.name}{{{selector}}})"


TRAINING = Dashboard("pretrain-training", "pretrain / training", (
    Panel("Step", ((_by_run(m.STEP, RANK), "{{run}}"),), kind="stat", width=6),
    Panel("Time since last step", ((f"time() - {_by_run(m.LAST_STEP_TIME, RANK)}", "{{run}}"),), unit="s",
          kind="stat", width=6, description="grows when the run stalls; the PretrainRunStalled alert fires on it"),
    Panel("Tokens trained", ((f"{m.TOKENS.name}{{{RUN}}}", "{{run}}"),), unit="short", kind="stat", width=6),
    Panel("Restarts", ((f"{m.RESTARTS.name}{{{RUN}}}", "{{run}}"),), kind="stat", width=6),
    Panel("Loss", ((f"{m.LOSS.name}{{{RUN}}}", "train {{run}}"), (f"{m.EVAL_LOSS.name}{{{RUN}}}", "eval {{run}}"))),
    Panel("Downstream evaluation", ((f"{m.EVAL_SCORE.name}{{{RUN}}}", "{{run}} {{task}} {{metric}}"),),
          description="lm-evaluation-harness scores of the in-loop evaluation, by task and metric"),
    Panel("Learning rate", ((f"{m.LEARNING_RATE.name}{{{RUN}}}", "{{run}}"),)),
    Panel("Throughput", ((_by_run(m.TOKENS_PER_SECOND, RANK, "sum"), "{{run}}"),
                         (f"rate({m.TOKENS.name}{{{RUN}}}[$__rate_interval])", "{{run}} (from tokens_total)")),
          unit="short", description="tokens per second over all ranks"),
    Panel("MFU", ((f"{m.MFU.name}{{{RUN}}}", "{{run}}"),), unit="percentunit",
          description="achieved FLOP/s over devices × metrics.peak_flops (H100 SXM dense bf16: 989 TFLOP/s)"),
    Panel("Step time per rank", (
        (f"{m.STEP_BUSY.name}{{{RANK}}}", "rank {{rank}} ({{node}}) busy"),
        (f"quantile by (run) (0.5, {m.STEP_BUSY.name}{{{RANK}}})", "median busy {{run}}"),
        (f"max by (run) ({m.STEP_DURATION.name}{{{RANK}}})", "step {{run}}"),
    ), unit="s", description="each rank's own part of the step, without waiting for slower ranks, and the whole step "
                             "(the same on every rank); a rank far above the median is a straggler"),
    Panel("Straggler ratio per rank", (
        (f"{m.STRAGGLER_RATIO.name}{{{RANK}}}", "rank {{rank}} ({{node}})"),
        (f"{m.STRAGGLER_THRESHOLD.name}{{{RUN}}}", "threshold"),
    ), description="busy time over the median of the other ranks; above the threshold a rank is a straggler"),
    Panel("Gradient norm", ((f"{m.GRAD_NORM.name}{{{RUN}}}", "{{run}}"),)),
    Panel("Loss spikes", ((f"increase({m.LOSS_SPIKES.name}{{{RUN}}}[$__rate_interval])", "{{run}} {{action}}"),),
          description="loss spikes the ranks found against their recent median (spikes.*), by what was done: "
                      "alert, skip (update dropped) or rewind (back to the last checkpoint)"),
    Panel("Device memory per rank", ((f"{m.GPU_MEMORY.name}{{{RANK}}}", "rank {{rank}} ({{node}})"),), unit="bytes"),
    Panel("Checkpoint duration", ((f"{m.CHECKPOINT_DURATION.name}{{{RUN}}}", "{{operation}}"),), unit="s"),
    Panel("Checkpoint size", ((f"{m.CHECKPOINT_SIZE.name}{{{RUN}}}", "{{operation}}"),), unit="bytes"),
    Panel("Steps since last checkpoint", (
        (f"{_by_run(m.STEP, RANK)} - {_by_run(m.CHECKPOINT_STEP)}", "{{run}}"),
        (f"{m.CHECKPOINT_INTERVAL.name}{{{RUN}}}", "checkpoint.every"),
    )),
    Panel("Ranks and exporters up", (
        (f"{m.RANKS.name}{{{RUN}}}", "ranks running"),
        (f'sum by (role) (up{{{RUN}}})', "{{role}} exporters up"),
    )),
    # Mixture of experts (model.moe): one row, empty for a dense model.
    Panel("MoE expert load: busiest and least loaded over the even share", (
        (f"max by (run, layer) ({m.MOE_LOAD_MAX.name}{{{RUN}}} / {m.MOE_LOAD_MEAN.name}{{{RUN}}})",
         "layer {{layer}} max"),
        (f"min by (run, layer) ({m.MOE_LOAD_MIN.name}{{{RUN}}} / {m.MOE_LOAD_MEAN.name}{{{RUN}}})",
         "layer {{layer}} min"),
    ), description="token copies routed to each MoE layer's busiest and least loaded expert over the mean: 1 is an "
                   "even load; the PretrainMoERouterCollapsed alert fires when a layer stays far from it"),
    Panel("MoE router entropy", ((f"max by (run, layer) ({m.MOE_ROUTER_ENTROPY.name}{{{RUN}}})", "layer {{layer}}"),),
          description="mean entropy of a token's expert probabilities, in nats: ln(num_experts) is uniform, 0 one "
                      "expert certain"),
    Panel("MoE balancing loss", ((f"max by (run, layer) ({m.MOE_BALANCE_LOSS.name}{{{RUN}}})", "layer {{layer}}"),),
          description="Σ f·P per layer, unweighted: 1 for an even load, num_experts when one expert takes every "
                      "token"),
    Panel("MoE dropped tokens", ((f"max by (run, layer) ({m.MOE_DROPPED.name}{{{RUN}}})", "layer {{layer}}"),),
          description="token copies dropped at the experts' capacity in the last step (model.moe.capacity_factor; "
                      "0 when dropless)"),
))

# dcgm-exporter labels a GPU with its node (`Hostname`) and, on Kubernetes, the pod using it: a run's pods are named
# after the run (`<run>-<cluster suffix>-...`); series without a pod label (bare metal) match every run.
_GPU = 'Hostname=~"$node", pod=~"($run-.*)?"'
GPUS = Dashboard("pretrain-gpus", "pretrain / GPUs (DCGM)", (
    Panel("SM active", ((f"DCGM_FI_PROF_SM_ACTIVE{{{_GPU}}}", "{{Hostname}} gpu {{gpu}}"),), unit="percentunit"),
    Panel("Tensor pipe active", ((f"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{_GPU}}}", "{{Hostname}} gpu {{gpu}}"),),
          unit="percentunit"),
    Panel("Memory used", ((f"DCGM_FI_DEV_FB_USED{{{_GPU}}} * 1024 * 1024", "{{Hostname}} gpu {{gpu}}"),),
          unit="bytes", description="DCGM reports MiB"),
    Panel("GPU utilisation", ((f"DCGM_FI_DEV_GPU_UTIL{{{_GPU}}}", "{{Hostname}} gpu {{gpu}}"),), unit="percent"),
    Panel("SM clock", ((f"DCGM_FI_DEV_SM_CLOCK{{{_GPU}}} * 1e6", "{{Hostname}} gpu {{gpu}}"),), unit="hertz",
          description="DCGM reports MHz; a GPU clocked below its peers (power or thermal throttling) holds up every "
                      "rank of the run alike"),
    Panel("Power", ((f"DCGM_FI_DEV_POWER_USAGE{{{_GPU}}}", "{{Hostname}} gpu {{gpu}}"),), unit="watt"),
    Panel("Temperature", ((f"DCGM_FI_DEV_GPU_TEMP{{{_GPU}}}", "{{Hostname}} gpu {{gpu}}"),), unit="celsius"),
    Panel("NVLink bandwidth", ((f"rate(DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL{{{_GPU}}}[$__rate_interval])",
                                "{{Hostname}} gpu {{gpu}}"),), unit="short"),
    Panel("Last XID error", ((f"DCGM_FI_DEV_XID_ERRORS{{{_GPU}}} > 0", "{{Hostname}} gpu {{gpu}}"),), kind="stat",
          description="non-zero: the code of the last XID error (hardware or driver fault) on that GPU"),
), variables=(RUN_VARIABLE, ("node", "label_values(DCGM_FI_DEV_GPU_UTIL, Hostname)")))

DATAPREP = Dashboard("pretrain-dataprep", "pretrain / dataprep", (
    Panel("Documents read per second", ((f"sum by (stage) (rate({m.DATAPREP_DOCUMENTS_IN.name}{{{RUN}}}"
                                         "[$__rate_interval]))", "{{stage}}"),)),
    Panel("Text read per second", ((f"sum by (stage) (rate({m.DATAPREP_BYTES_IN.name}{{{RUN}}}"
                                    "[$__rate_interval]))", "{{stage}}"),), unit="Bps"),
    Panel("Tokens written per second", ((f"sum by (stage) (rate({m.DATAPREP_TOKENS_OUT.name}{{{RUN}}}"
                                         "[$__rate_interval]))", "{{stage}}"),)),
    Panel("Fraction kept per stage", ((f"sum by (stage) ({m.DATAPREP_DOCUMENTS_OUT.name}{{{RUN}}}) / "
                                       f"sum by (stage) ({m.DATAPREP_DOCUMENTS_IN.name}{{{RUN}}})", "{{stage}}"),),
          unit="percentunit"),
    Panel("Documents removed by rule", ((f"sum by (stage, rule) ({m.DATAPREP_REMOVED.name}{{{RUN}}})",
                                         "{{stage}}: {{rule}}"),), kind="bargauge"),
    Panel("Totals", (
        (f"sum by (stage) ({m.DATAPREP_DOCUMENTS_OUT.name}{{{RUN}}})", "{{stage}} documents"),
        (f"sum by (stage) ({m.DATAPREP_TOKENS_OUT.name}{{{RUN}}})", "{{stage}} tokens"),
    ), kind="stat"),
), variables=(("run", f"label_values({m.DATAPREP_DOCUMENTS_IN.name}, run)"),))

DASHBOARDS = (TRAINING, GPUS, DATAPREP)


def build_dashboard(dashboard: Dashboard) -> dict[str, Any]:
    """Grafana's dashboard JSON model (schema 39) for one dashboard."""
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "tags": ["pretrain"],
        "timezone": "utc",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [_datasource_variable()] + [_query_variable(*v) for v in dashboard.variables]},
        "panels": _layout(dashboard.panels),
    }


def panel_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of a dashboard JSON."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def _layout(panels: tuple[Panel, ...]) -> list[dict[str, Any]]:
    out, x, y, row_height = [], 0, 0, 0
    for index, panel in enumerate(panels, start=1):
        height = 4 if panel.kind == "stat" else 8
        if x + panel.width > GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        out.append({
            "id": index,
            "type": panel.kind,
            "title": panel.title,
            "description": panel.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": height, "w": panel.width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if panel.kind == "timeseries" else {},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                for i, (expr, legend) in enumerate(panel.targets)
            ],
        })
        x, row_height = x + panel.width, max(row_height, height)
    return out


def _datasource_variable() -> dict[str, Any]:
    return {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0}


def _query_variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": name, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".+", "current": {}, "sort": 1, "hide": 0,
    }

