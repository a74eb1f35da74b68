"""`pretrain k8s render` and the committed kustomize tree: rendered with kubectl, validated against the schemas.

Core kinds go through `kubernetes-validate --strict`; RayJob (and the RayCluster inside it) through KubeRay's own
CRD schema with unknown fields made errors, as the API server's structural-schema pruning would silently drop them.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator.cli import main

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "tests" / "data" / "k8s-crds"
K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
CORE_KINDS = {"ConfigMap", "PersistentVolumeClaim", "PodTemplate"}
VALIDATOR = Path(sys.executable).with_name("kubernetes-validate")

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    plural = {"RayJob": "rayjobs", "RayCluster": "rayclusters"}[kind]
    crd = yaml.load(gzip.decompress((CRDS / f"ray.io_{plural}.yaml.gz").read_bytes()), Loader=yaml.CSafeLoader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(copy.deepcopy(version["schema"]["openAPIV3Schema"])))


def _strict(schema: dict) -> dict:
    """OpenAPI v3 → JSON Schema where a field the CRD does not declare is an error."""
    if schema.get("x-kubernetes-int-or-string"):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    for key in ("properties", "patternProperties"):
        for sub in schema.get(key, {}).values():
            _strict(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            _strict(sub)
    return schema


def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate(documents: list[dict], tmp_path: Path) -> None:
    """Every document against its schema; the pod templates inside the RayJob count as core PodTemplates too."""
    core = [d for d in documents if d["kind"] in CORE_KINDS]
    for doc in documents:
        if doc["kind"] == "RayJob":
            crd_validator("RayJob").validate(doc)
            cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"},
                       "spec": doc["spec"]["rayClusterSpec"]}
            crd_validator("RayCluster").validate(cluster)
            spec = doc["spec"]
            groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
            for i, template in enumerate([g["template"] for g in groups] + [spec["submitterPodTemplate"]]):
                core.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"},
                             "template": template})
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    result = subprocess.run([str(VALIDATOR), "--strict", "--quiet", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {d["kind"] for d in core} >= {"ConfigMap", "PersistentVolumeClaim", "PodTemplate"}


def by_kind(documents: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in documents:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def render(*args: str) -> int:
    return main(["k8s", "render", *args])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_matches_its_spec_and_validates(overlay, tmp_path):
    from orchestrator.validate import parse_spec

    documents = kustomize(K8S / "overlays" / overlay)
    validate(documents, tmp_path)
    kinds = by_kind(documents)
    assert set(kinds) == {"RayJob", "ConfigMap", "PersistentVolumeClaim", "PodMonitor", "PrometheusRule"}
    [rayjob] = kinds["RayJob"]
    spec_map = next(c for c in kinds["ConfigMap"] if "job.yaml" in c["data"])
    spec = parse_spec(yaml.safe_load(spec_map["data"]["job.yaml"]), source=spec_map["metadata"]["name"])
    # What the pods run is what the spec asks for: one worker pod per node, its GPUs requested and limited.
    [workers] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == spec.resources.num_nodes
    [container] = workers["template"]["spec"]["containers"]
    gpus = str(spec.resources.gpus_per_node)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus == workers["rayStartParams"]["num-gpus"]
    assert rayjob["metadata"]["name"] == spec.name
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert volumes["job-spec"]["configMap"]["name"] == spec_map["metadata"]["name"]
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    [pvc] = kinds["PersistentVolumeClaim"]
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NCCL_SOCKET_IFNAME"] and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    # The PodMonitor scrapes ports the pods declare: the controller's on the head, one per rank on the workers.
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    declared = {p["name"]: p["containerPort"] for c in (head, container) for p in c["ports"]}
    [monitor] = kinds["PodMonitor"]
    scraped = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert set(scraped) <= set(declared)
    assert sorted(declared[f"metrics-r{i}"] for i in range(spec.resources.gpus_per_node)) == list(
        range(spec.metrics.port + 1, spec.metrics.port + 1 + spec.resources.gpus_per_node))
    assert declared["metrics-ctl"] == spec.metrics.port
    assert monitor["spec"]["selector"]["matchLabels"].items() <= workers["template"]["metadata"]["labels"].items()
    dashboards = next(c for c in kinds["ConfigMap"] if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1")
    assert {json.loads(text)["uid"] for text in dashboards["data"].values()} == {
        "pretrain-training", "pretrain-gpus", "pretrain-dataprep"}
    security = workers["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["ttlSecondsAfterFinished"] > 0 and rayjob["spec"]["activeDeadlineSeconds"] > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_committed_tree_is_what_render_writes(overlay, tmp_path):
    out = tmp_path / "overlays" / overlay
    assert render(str(K8S / "specs" / f"{overlay}.yaml"), "-o", str(out), "--base", "../../base") == 0
    for written in sorted(tmp_path.rglob("*")):
        if written.is_file():
            committed = K8S / written.relative_to(tmp_path)
            assert committed.read_text() == written.read_text(), f"{committed} is stale: regenerate with `make k8s`"


def test_standalone_render_with_options_applies_as_is(tmp_path, capsys):
    out = tmp_path / "run"
    assert render(str(K8S / "specs" / "4x8.yaml"), "resources.num_nodes=2", "parallel.pp=1", "-o", str(out),
                  "--image", "registry.example/pretrain:1.2", "--storage-class", "nfs-rwx", "--queue", "gpu-queue") == 0
    assert "kubectl apply -k" in capsys.readouterr().out
    documents = kustomize(out)
    validate(documents, tmp_path)
    kinds = by_kind(documents)
    [rayjob] = kinds["RayJob"]
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert rayjob["spec"]["suspend"] is True
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
    images = {c["image"] for g in [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"],
                                   *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {"registry.example/pretrain:1.2"}
    assert kinds["PersistentVolumeClaim"][0]["spec"]["storageClassName"] == "nfs-rwx"


def test_cpu_spec_renders_without_gpus(tmp_path):
    out = tmp_path / "cpu"
    assert render(str(K8S / "specs" / "1x8.yaml"), "resources.device=cpu", "resources.gpus_per_node=2",
                  "-o", str(out)) == 0
    [rayjob] = by_kind(kustomize(out))["RayJob"]
    [workers] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert "nvidia.com/gpu" not in workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert workers["rayStartParams"]["num-gpus"] == "0"


def test_the_crd_schema_rejects_unknown_fields(tmp_path):
    """The strict schema is not vacuous: a misspelt field deep in a pod template fails."""
    [rayjob] = by_kind(kustomize(K8S / "overlays" / OVERLAYS[0]))["RayJob"]
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(jsonschema.ValidationError, match="'resource' was unexpected"):
        crd_validator("RayJob").validate(rayjob)


def test_a_wrong_layout_fails_with_the_spec_error(tmp_path, capsys):
    out = tmp_path / "bad"
    assert render(str(K8S / "specs" / "1x8.yaml"), "parallel.dp=3", "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert "parallel: dp=3 × pp=1 × tp=1 = 3, but the run has 8 ranks" in err
    assert "Traceback" not in err
    assert not out.exists(), "nothing is written for a bad spec"


def test_paths_outside_the_shared_volume_fail_with_the_field(tmp_path, capsys):
    out = tmp_path / "bad"
    code = render(str(K8S / "specs" / "1x8.yaml"), "checkpoint.dir=runs/x/checkpoints", "data.path=/scratch/shards",
                  "name=Llama_8B", "-o", str(out))
    err = capsys.readouterr().err
    assert code == 2
    assert "3 problems" in err
    assert "checkpoint.dir: 'runs/x/checkpoints' is not on the shared volume" in err
    assert "data.path: '/scratch/shards' is not on the shared volume" in err
    assert "name: 'Llama_8B' cannot name Kubernetes objects" in err
    assert not out.exists()


def test_remote_checkpoints_are_allowed(tmp_path):
    assert render(str(K8S / "specs" / "1x8.yaml"), "checkpoint.dir=s3://b/ckpt", "-o", str(tmp_path / "s3")) == 0
