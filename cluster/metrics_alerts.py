"""Alerting rules of a run, as a plain Prometheus rules file and as a Prometheus Operator `PrometheusRule`.

Thresholds that the job spec already states (checkpoint.every, resources.straggler_factor) are read from series the
exporters publish, not copied into the rules, so one rules file fits every run. Each alert has a promtool unit test
that fires it on synthetic series (tests/cluster/prometheus_alerts_test.yml).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster import metrics as m

GROUP = "pretrain"
STALL_MINUTES = 15
# A collapsed router: a MoE layer's busiest expert gets over MOE_OVERLOAD times the even share of the token copies,
# or its least loaded one under MOE_STARVED of it, for MOE_COLLAPSE_MINUTES. Balanced training stays within 2× (the
# auxiliary-loss-free bias keeps it near 1); a layer sending everything to top_k of E experts reaches E / top_k.
MOE_OVERLOAD = 3
MOE_STARVED = 0.05
MOE_COLLAPSE_MINUTES = 15


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    duration: str
    severity: str
    summary: str
    description: str


ALERTS = (
    Alert("PretrainRunStalled",
          f"time() - max by (run) ({m.LAST_STEP_TIME.name}) > {STALL_MINUTES * 60}", "1m", "critical",
          "Run {{ $labels.run }} has finished no step for " + f"{STALL_MINUTES} minutes",
          "No rank of run {{ $labels.run }} has finished an optimizer step for {{ $value | humanizeDuration }}. "
          "Look for a hang (per-rank stack dumps in the rank logs), a dead node or a stuck checkpoint write."),
    Alert("PretrainLossNaN", f"{m.LOSS.name} != {m.LOSS.name}", "0m", "critical",
          "Run {{ $labels.run }} reports a NaN loss",
          "The training loss of run {{ $labels.run }} is NaN: the run diverged or read corrupt data; "
          "resume from an earlier checkpoint with a lower learning rate."),
    Alert("PretrainLossSpike",
          f"{m.LOSS.name} > 1.5 * avg_over_time({m.LOSS.name}[1h] offset 10m)", "5m", "warning",
          "Run {{ $labels.run }}'s loss is 50% above its average of the hour before",
          "The loss of run {{ $labels.run }} is {{ $value }}, well above its recent average; check the gradient norm "
          "and learning rate panels."),
    # Found by the ranks themselves against the median of the last spikes.window steps (parallel.spikes), and already
    # acted on by the spec's spikes.action; PretrainLossSpike above catches a lasting rise this does not count.
    Alert("PretrainLossSpikesFound", f"max by (run, action) (increase({m.LOSS_SPIKES.name}[1h])) > 0", "0m",
          "warning", "Run {{ $labels.run }} had loss spikes in the last hour (handled by: {{ $labels.action }})",
          "The ranks of run {{ $labels.run }} found loss or gradient-norm spikes against their recent median and "
          "handled them with spikes.action={{ $labels.action }}. history.jsonl's spike records give each step, its "
          "values against the baseline and the data skipped; repeated spikes call for a lower learning rate or a "
          "look at those data windows."),
    Alert("PretrainRestartsRising", f"increase({m.RESTARTS.name}[1h]) >= 2", "0m", "warning",
          "Run {{ $labels.run }} restarted {{ $value }} times in the last hour",
          "The controller restarted the gang of run {{ $labels.run }} repeatedly: a failing node or a reproducible "
          "crash. Check the controller log and the XID panel of the GPU dashboard."),
    Alert("PretrainStraggler",
          f"{m.STRAGGLER_RATIO.name} > on (run) group_left () {m.STRAGGLER_THRESHOLD.name}", "10m", "warning",
          "Rank {{ $labels.rank }} of run {{ $labels.run }} is a straggler",
          "Rank {{ $labels.rank }} on {{ $labels.node }} is busy {{ $value }}× the other ranks' median; the whole run "
          "waits for it. Check that node's GPUs (thermal throttling, XID errors) and network."),
    Alert("PretrainCheckpointOverdue",
          f"max by (run) ({m.STEP.name}) - max by (run) ({m.CHECKPOINT_STEP.name}) "
          f"> 2 * max by (run) ({m.CHECKPOINT_INTERVAL.name} > 0)", "5m", "warning",
          "Run {{ $labels.run }} has not checkpointed for over two checkpoint intervals",
          "Run {{ $labels.run }} is {{ $value }} steps past its last checkpoint: saves are failing or slow; a "
          "failure now would lose that work. Check storage space and the checkpoint duration panel."),
    Alert("PretrainMoERouterCollapsed",
          f"max by (run, layer) ({m.MOE_LOAD_MAX.name} / {m.MOE_LOAD_MEAN.name}) > {MOE_OVERLOAD} or "
          f"min by (run, layer) ({m.MOE_LOAD_MIN.name} / {m.MOE_LOAD_MEAN.name}) < {MOE_STARVED}",
          f"{MOE_COLLAPSE_MINUTES}m", "warning",
          "The router of MoE layer {{ $labels.layer }} of run {{ $labels.run }} has collapsed",
          "An expert of layer {{ $labels.layer }} in run {{ $labels.run }} has been getting {{ $value }}× the even "
          f"share of the tokens for {MOE_COLLAPSE_MINUTES} minutes (over {MOE_OVERLOAD}×, or under {MOE_STARVED}×): "
          "a few experts take the layer's tokens and the others learn nothing. Check the MoE panels; raise "
          "model.moe.bias_update_rate or model.moe.aux_loss_coef (model.moe.balance)."),
    # A rank exporter down while its run's controller still answers: the run is live, the rank is not. The controller
    # takes a run's targets out of the file_sd file when the run ends (finished, stopped or failed), and a controller
    # that is itself down means the job's driver is gone, so a run that is over never fires this.
    Alert("PretrainExporterDown", 'up{role="rank"} == 0 and on (run) (up{role="controller"} == 1)', "5m", "warning",
          "An exporter of run {{ $labels.run }} is down",
          "Prometheus cannot scrape the {{ $labels.role }} exporter at {{ $labels.instance }} of run "
          "{{ $labels.run }} while its controller runs: the rank's process died or its node is unreachable, and no "
          "restart has replaced it."),
)


def build_rules() -> dict[str, Any]:
    """The plain rules file (`rule_files:` in prometheus.yml), the body of the PrometheusRule too."""
    return {"groups": [{"name": GROUP, "rules": [_rule(a) for a in ALERTS]}]}


def build_prometheus_rule(name: str = "pretrain", labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The same rules for the Prometheus Operator; `labels` must match its ruleSelector (e.g. a Helm release)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "pretrain", **(labels or {})}},
        "spec": build_rules(),
    }


def _rule(alert: Alert) -> dict[str, Any]:
    return {
        "alert": alert.name,
        "expr": alert.expr,
        "for": alert.duration,
        "labels": {"severity": alert.severity},
        "annotations": {"summary": alert.summary, "description": alert.description},
    }
