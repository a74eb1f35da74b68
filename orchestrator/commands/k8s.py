"""`pretrain k8s render job.yaml [-o DIR]`: KubeRay manifests for a run, rendered from its job spec.

The spec stays the single source of truth: the worker group's size and GPUs come from `resources`, the spec itself
is mounted into the pods from a ConfigMap, and the entrypoint runs `pretrain` on it. The output is a kustomize
directory, so `kubectl apply -k DIR` starts the run:

    pretrain k8s render examples/llama-8b.yaml -o out/llama-8b --image registry.example/pretrain:0.1.0
    kubectl apply -k out/llama-8b

With `--base PATH` (relative to DIR) the parts shared by every run (the data PVC, the Grafana dashboards and the
alert rules) are written to PATH instead and referenced from DIR: that is how `k8s/base` and `k8s/overlays/*` are
generated. A spec that does not validate, or that cannot run on Kubernetes (a checkpoint directory outside the
mounted volume, say), fails with the spec's `SpecError` and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Any

import yaml

from orchestrator.errors import Problem, SpecError
from orchestrator.spec import JobSpec

DATA_MOUNT = "/data"
SPEC_MOUNT = "/etc/pretrain"
SPEC_FILE = "job.yaml"
DATA_PVC = "pretrain-data"
DASHBOARDS_CONFIGMAP = "pretrain-dashboards"
PART_OF = {"app.kubernetes.io/part-of": "pretrain"}
RUN_LABEL = "pretrain.io/run"
RAY_METRICS_PORT = 8080
# The RayJob's entrypoint runs on the head pod, inside the cluster: it is the controller itself, given the spec the
# way `pretrain submit --address` gives it (orchestrator.controller's Jobs API entry point).
ENTRYPOINT = f'PRETRAIN_SPEC="$(cat {SPEC_MOUNT}/{SPEC_FILE})" python -m orchestrator.controller'
NCCL_ENV = {
    "NCCL_DEBUG": "WARN",
    "NCCL_SOCKET_IFNAME": "eth0",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_MAX = 40  # KubeRay appends a cluster suffix and pod suffixes to the run name; pod hostnames stop at 63


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)
    render = sub.add_parser("render", help="write a kustomize directory (RayJob, ConfigMaps, PVC, monitoring)")
    render.add_argument("spec", help="job spec YAML")
    render.add_argument("overrides", nargs="*", help="section.key=value overrides")
    render.add_argument("-o", "--output", default="k8s-run", help="directory to write (default: %(default)s)")
    render.add_argument("--base", help="put the shared parts in this directory (relative to --output)")
    render.add_argument("--image", default="pretrain:0.1.0", help="container image with pretrain installed")
    render.add_argument("--storage-class", default="", help="RWX storage class of the data PVC (default: cluster's)")
    render.add_argument("--storage-size", default="1Ti", help="size of the data PVC (default: %(default)s)")
    render.add_argument("--queue", default="", help="Kueue LocalQueue: admit the run as one gang")
    render.add_argument("--memory", default="256Gi", help="memory of each worker pod (default: %(default)s)")
    render.add_argument("--shm-size", default="64Gi", help="/dev/shm of each worker pod (default: %(default)s)")
    render.add_argument("--deadline", type=int, default=14 * 86400, help="activeDeadlineSeconds (default: 14 days)")
    render.add_argument("--ttl", type=int, default=3600, help="seconds the finished cluster is kept (default: 1 h)")
    render.add_argument("--metrics-port", type=int, default=9500,
                        help="metrics.port when the spec leaves it 0: Kubernetes needs fixed ports")
    render.add_argument("--prometheus-release", default="kube-prometheus-stack",
                        help="`release` label the Prometheus Operator selects monitors and rules by")


def run(args: argparse.Namespace) -> int:
    from orchestrator.validate import load_spec

    spec = load_spec(args.spec, args.overrides)
    check_kubernetes_spec(spec, args.spec, metrics_port=args.metrics_port)
    spec.metrics.port = spec.metrics.port or args.metrics_port
    files = render(spec, args, mounted_spec_text(args.spec, args.overrides, spec))
    for path, text in files.items():
        full = os.path.join(args.output, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(text)
    print(f"pretrain k8s: wrote {len(files)} files to {args.output}; start the run: kubectl apply -k {args.output}")
    return 0


def check_kubernetes_spec(spec: JobSpec, source: str, *, metrics_port: int) -> None:
    """What a valid spec still needs to run in pods: a DNS name, storage on the shared volume, fixed ports."""
    problems = []
    if not _NAME.match(spec.name) or len(spec.name) > _NAME_MAX:
        problems.append(Problem("name", f"{spec.name!r} cannot name Kubernetes objects: use at most {_NAME_MAX} "
                                "lowercase letters, digits and '-', starting and ending with a letter or digit"))
    for path, value, remote_ok in (("checkpoint.dir", spec.checkpoint.dir, True), ("data.path", spec.data.path, False)):
        if remote_ok and "://" in value:
            continue
        if not os.path.normpath(value).startswith(DATA_MOUNT + "/"):
            where = " or a remote URI (s3://, gs://)" if remote_ok else ""
            problems.append(Problem(path, f"{value!r} is not on the shared volume: pods keep only what is written "
                                    f"under {DATA_MOUNT}/ (the ReadWriteMany PVC){where}"))
    port = spec.metrics.port or metrics_port
    if not 1024 <= port <= 65535 - 1 - spec.resources.gpus_per_node:
        problems.append(Problem("metrics.port", f"{port} leaves no room for the controller and "
                                f"{spec.resources.gpus_per_node} rank ports below 65536; use 1024-60000"))
    if problems:
        raise SpecError(source, problems)


def mounted_spec_text(path: str, overrides: list[str], spec: JobSpec) -> str:
    """The spec as the user wrote it, overrides applied and the metrics port fixed: what the pods read.

    Kept unresolved (defaults stay implicit) so that it reads like the user's file, and the controller resolves it
    with the same rules as everywhere else.
    """
    from omegaconf import OmegaConf

    from orchestrator.validate import load_yaml

    raw = OmegaConf.merge(OmegaConf.create(load_yaml(path)), OmegaConf.from_dotlist(list(overrides)))
    data = OmegaConf.to_container(raw, resolve=False)
    data.setdefault("metrics", {})["port"] = spec.metrics.port
    return f"# Rendered by `pretrain k8s render` from {os.path.basename(path)}.\n" + yaml.safe_dump(
        data, sort_keys=False, width=120)


def render(spec: JobSpec, args: argparse.Namespace, spec_text: str) -> dict[str, str]:
    """{relative path: text} of the kustomize directory (and of the base, under `args.base`)."""
    from cluster.metrics_alerts import build_prometheus_rule, build_rules
    from cluster.metrics_dashboards import DASHBOARDS, build_dashboard

    shared: dict[str, Any] = {
        "pvc.yaml": build_data_pvc(args.storage_class, args.storage_size),
        "prometheus/rules.yml": build_rules(),
        "prometheus/prometheusrule.yaml": build_prometheus_rule(labels={"release": args.prometheus_release}),
    }
    shared.update({f"grafana/{d.uid}.json": build_dashboard(d) for d in DASHBOARDS})
    run_parts: dict[str, Any] = {
        SPEC_FILE: spec_text,
        "rayjob.yaml": build_rayjob(spec, args),
        "podmonitor.yaml": build_pod_monitor(spec, args.prometheus_release),
    }
    files: dict[str, str] = {}
    if args.base:
        files.update({os.path.join(args.base, p): _text(v) for p, v in shared.items()})
        files[os.path.join(args.base, "kustomization.yaml")] = _text(_kustomization(shared, []))
        files["kustomization.yaml"] = _text(_kustomization(run_parts, [args.base], spec_configmap(spec.name)))
    else:
        files.update({p: _text(v) for p, v in shared.items()})
        files["kustomization.yaml"] = _text(_kustomization({**shared, **run_parts}, [], spec_configmap(spec.name)))
    files.update({p: _text(v) for p, v in run_parts.items()})
    return files


def build_rayjob(spec: JobSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The RayJob: a head pod running the controller, one worker pod per node holding that node's ranks."""
    r, port = spec.resources, spec.metrics.port
    gpus = r.gpus_per_node if r.device != "cpu" else 0
    labels = {**PART_OF, RUN_LABEL: spec.name}
    head_ports = [("gcs", 6379), ("dashboard", 8265), ("client", 10001), ("ray-metrics", RAY_METRICS_PORT),
                  ("metrics-ctl", port)]
    worker_ports = [("ray-metrics", RAY_METRICS_PORT)]
    worker_ports += [(f"metrics-r{i}", port + 1 + i) for i in range(r.gpus_per_node)]
    worker_cpus = math.ceil(r.cpus_per_rank * r.gpus_per_node) + 2
    worker_resources = {"cpu": str(worker_cpus), "memory": args.memory}
    if gpus:
        worker_resources["nvidia.com/gpu"] = str(gpus)
    metadata: dict[str, Any] = {"name": spec.name, "labels": dict(labels)}
    if args.queue:
        metadata["labels"]["kueue.x-k8s.io/queue-name"] = args.queue
    rayjob: dict[str, Any] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata,
        "spec": {
            "entrypoint": ENTRYPOINT,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": args.ttl,
            "activeDeadlineSeconds": args.deadline,
            # The controller restarts the gang from its checkpoints itself; a second RayJob attempt starts a fresh
            # cluster and resumes from the same checkpoints after a failure the controller could not handle.
            "backoffLimit": 1,
            "submitterPodTemplate": {"spec": {
                "restartPolicy": "Never",
                "securityContext": _pod_security(),
                "containers": [_container("ray-job-submitter", args.image, {"cpu": "500m", "memory": "512Mi"}, [],
                                          mounts=[])],
            }},
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {
                    "rayStartParams": {"num-gpus": "0", "dashboard-host": "0.0.0.0",
                                       "metrics-export-port": str(RAY_METRICS_PORT)},
                    "template": _pod_template(labels, "head", _container(
                        "ray-head", args.image, {"cpu": "4", "memory": "16Gi"}, head_ports), shm="8Gi"),
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu" if gpus else "cpu",
                    "replicas": r.num_nodes,
                    "minReplicas": r.num_nodes,
                    "maxReplicas": r.num_nodes,
                    "rayStartParams": {"num-gpus": str(gpus), "metrics-export-port": str(RAY_METRICS_PORT)},
                    "template": _pod_template(labels, "worker", _container(
                        "ray-worker", args.image, worker_resources, worker_ports, env=NCCL_ENV), shm=args.shm_size,
                        gpu=bool(gpus)),
                }],
            },
        },
    }
    if args.queue:
        rayjob["spec"]["suspend"] = True  # Kueue unsuspends it once the whole gang fits
    return rayjob


def build_pod_monitor(spec: JobSpec, release: str) -> dict[str, Any]:
    """Scrape the controller, every rank port and Ray's own metrics of this run's pods."""
    run_label = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", RUN_LABEL)

    def endpoint(port: str, role: str) -> dict[str, Any]:
        return {"port": port, "interval": "15s", "honorLabels": True, "relabelings": [
            {"sourceLabels": [run_label], "targetLabel": "run"},
            {"targetLabel": "role", "replacement": role},
        ]}

    ports = [endpoint("metrics-ctl", "controller"), endpoint("ray-metrics", "ray")]
    ports += [endpoint(f"metrics-r{i}", "rank") for i in range(spec.resources.gpus_per_node)]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{spec.name}-metrics", "labels": {**PART_OF, RUN_LABEL: spec.name, "release": release}},
        "spec": {"selector": {"matchLabels": {**PART_OF, RUN_LABEL: spec.name}}, "podMetricsEndpoints": ports},
    }


def build_data_pvc(storage_class: str, size: str) -> dict[str, Any]:
    """One ReadWriteMany volume for shards and checkpoints, shared by every pod and kept across runs."""
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": DATA_PVC, "labels": dict(PART_OF)}, "spec": spec}


def spec_configmap(run: str) -> str:
    return f"{run}-job-spec"


def _pod_template(labels: dict[str, str], role: str, container: dict[str, Any], *, shm: str,
                  gpu: bool = False) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": DATA_PVC}},
            {"name": "job-spec", "configMap": {"name": spec_configmap(labels[RUN_LABEL])}},
            # NCCL and the DataLoader share memory through /dev/shm; a container's default 64 MiB breaks both.
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        ],
    }
    if gpu:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {**labels, "pretrain.io/role": role}}, "spec": pod}


def _container(name: str, image: str, resources: dict[str, str], ports: list[tuple[str, int]],
               env: dict[str, str] | None = None, mounts: list[dict[str, str]] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_MOUNT},
            {"name": "job-spec", "mountPath": SPEC_MOUNT, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
        ] if mounts is None else mounts,
    }
    if ports:
        container["ports"] = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports]
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    return container


def _pod_security() -> dict[str, Any]:
    # The Ray images run as uid 1000 (`ray`) in group 100; fsGroup makes the shared volume writable to it.
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _kustomization(parts: dict[str, Any], bases: list[str], spec_configmap: str = "") -> dict[str, Any]:
    resources = bases + [p for p in parts if p.endswith(".yaml") and p not in (SPEC_FILE,)]
    kustomization: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                     "labels": [{"pairs": dict(PART_OF)}], "resources": resources}
    generators = []
    if spec_configmap:
        generators.append({"name": spec_configmap, "files": [SPEC_FILE]})
    dashboards = sorted(p for p in parts if p.startswith("grafana/"))
    if dashboards:
        generators.append({"name": DASHBOARDS_CONFIGMAP, "files": dashboards,
                           "options": {"labels": {"grafana_dashboard": "1"},
                                       "annotations": {"grafana_folder": "pretrain"}}})
    if generators:
        kustomization["configMapGenerator"] = generators
        # KubeRay pod templates are not a kind kustomize knows: hashed ConfigMap names would not be rewritten there.
        kustomization["generatorOptions"] = {"disableNameSuffixHash": True}
    return kustomization


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "panels" in value:
        return json.dumps(value, indent=2) + "\n"
    return yaml.safe_dump(value, sort_keys=False, width=120)
