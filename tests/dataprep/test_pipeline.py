"""The whole prep pipeline on real sample corpora: one node, two nodes, a crash and a rerun, the same shards."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from dataprep.config import load_prep_config
from dataprep.executor import connect_ray
from dataprep.pipeline import run_prep
from dataprep.shards import open_shard, read_manifest, shard_paths, verify_shard
from dataprep.stats import PrepStats

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dataprep_ray")]


@pytest.fixture(scope="module")
def prep_yaml(tmp_path_factory, sample_corpora):
    root = tmp_path_factory.mktemp("prep")
    with gzip.open(sample_corpora["fortunes"], "rb") as f:
        good = [next(f) for _ in range(3)]
    bad = root / "bad.jsonl"
    bad.write_bytes(good[0] + b'{"id": 1, "text": broken}\n' + good[1] + b'{"id": 2}\n' + good[2])
    config = {
        "name": "test", "output": str(root / "one" / "shards"), "seq_len": 64, "num_cpus": 2,
        "rows_per_shard": 400, "mix": {"val_fraction": 0.05, "temperature": 2.0, "max_epochs": 2},
        "filters": {"c4": {"drop_lines_without_terminal_punct": False, "min_words_per_line": 0}},
        "tokenizer": {"vocab_size": 512, "sample_bytes": 300_000},
        "sources": {
            "wiki": {"path": str(sample_corpora["wiki_vital_en"])},
            "wiki_fr": {"path": str(sample_corpora["wiki_vital_fr"])},
            "code": {"path": str(sample_corpora["django_code"]), "kind": "code"},
            "django": {"path": str(sample_corpora["django_docs"]), "kind": "code", "priority": -1},
            "bad": {"path": str(bad), "kind": "code"},
        },
    }
    path = root / "prep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _shard_hashes(output) -> dict[str, list[str]]:
    manifest = read_manifest(output)
    return {split: [e["sha256"] for e in s["shards"]] for split, s in manifest["splits"].items()}


@pytest.fixture(scope="module")
def single_node(prep_yaml):
    import ray

    config = load_prep_config(prep_yaml)
    stats, seen, stop = PrepStats(), [], threading.Event()

    def poll():
        while not stop.is_set():
            seen.append(stats.snapshot())
            stop.wait(0.02)

    connect_ray(None, num_cpus=2, progress=False)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        report = run_prep(config, stats=stats, progress=False)
    finally:
        stop.set()
        poller.join()
        ray.shutdown()
    return config, report, seen


def test_shards_are_valid_and_hold_the_tokenized_mix(single_node):
    config, report, _ = single_node
    manifest = read_manifest(config.output)
    vocab, eos = manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["eos_id"]
    assert 256 < vocab <= 512 and manifest["seq_len"] == 64
    rows = []
    for split in ("train", "val"):
        for entry in manifest["splits"][split]["shards"]:
            verify_shard(config.output, entry)
        rows.append(np.concatenate([open_shard(p, 64) for p in shard_paths(config.output, manifest, split)]))
    train, val = rows
    assert train.shape == (manifest["splits"]["train"]["rows"], 65) and len(val) > 0
    assert train.max() < vocab and (train == eos).any()
    sources = manifest["sources"]
    assert sources["wiki_fr"]["tokens"] == 0, "French is filtered out by language id"
    assert abs(sum(s["realised_share"] for s in sources.values()) - 1) < 1e-3
    assert all(s["epochs"] <= 2 + 1e-9 for s in sources.values())
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(os.path.join(config.output, "tokenizer.json")).decode(train[0].tolist())
    assert len(text) > 64


def test_report_balances_and_names_bad_input(single_node):
    config, report, _ = single_node
    assert report["conservation"]["ok"]
    for name, s in report["sources"].items():
        assert s["docs_in"] == s["docs_kept"] + sum(s["removed"].values()), name
        # the length report counts each training document once, as encoding did
        assert s["doc_lengths"]["documents"] == s["train_docs"], name
        if s["train_docs"]:
            q = s["doc_lengths"]["quantiles"]
            assert q["p10"] <= q["p50"] <= q["p90"] <= q["p99"] <= q["max"], name
    removed = report["totals"]["removed"]
    assert removed["exact_duplicate"] > 0 and report["sources"]["wiki_fr"]["docs_kept"] == 0
    bad = {(os.path.basename(b["file"]), b["line"], b["reason"]) for b in report["bad_input"]["listed"]}
    assert bad == {("bad.jsonl", 2, "malformed_json"), ("bad.jsonl", 4, "missing_field")}
    assert report["sources"]["bad"]["docs_kept"] == 3
    assert os.path.getsize(os.path.join(config.output, "report.png")) > 10_000
    with open(os.path.join(config.output, "report.json")) as f:
        assert json.load(f)["config_hash"] == report["config_hash"]


def test_stats_are_pollable_while_running(single_node):
    _, report, seen = single_node
    last = seen[-1]
    assert {"ingest", "dedup", "select", "encode", "pack", "write"} <= {*last["stage_seconds"], last["stage"]}
    # Polled while running: several stages seen as they ran (the shortest of this small corpus last tens of
    # milliseconds, which a loaded machine's poller can sleep through).
    assert len({s["stage"] for s in seen} - {"starting", last["stage"]}) >= 3, [s["stage"] for s in seen]
    final = last["counters"]
    assert final["docs_in"] == report["totals"]["docs_in"] and final["docs_kept"] == report["totals"]["docs_kept"]


def test_two_node_cluster_with_distributed_components_writes_the_same_shards(single_node, prep_yaml, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from cluster.local import system_config

    config, _, _ = single_node
    other = load_prep_config(prep_yaml, [f"output={tmp_path}/shards", "dedup.local_components_max_edges=0"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": system_config(1)})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        report = run_prep(other, progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert report["dedup"]["rounds"] >= 1, "components were found by distributed contraction"
    assert _shard_hashes(other.output) == _shard_hashes(config.output)


def test_crash_and_rerun_resumes_and_gives_identical_output(single_node, prep_yaml, tmp_path):
    config, _, _ = single_node
    out, work = tmp_path / "shards", tmp_path / "work"
    command = [sys.executable, "-m", "orchestrator.cli", "prep", str(prep_yaml), f"output={out}",
               f"work_dir={work}", "--quiet"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if work.exists() and any(p.name.startswith("select-") for p in work.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    ingest = next(p for p in work.iterdir() if p.name.startswith("ingest-"))
    before = {p.name: p.stat().st_mtime_ns for p in ingest.iterdir()}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "" and " INFO " not in done.stderr, "--quiet prints no progress"
    assert {p.name: p.stat().st_mtime_ns for p in ingest.iterdir()} == before, "finished work is not redone"
    assert read_manifest(out) == read_manifest(config.output), "same inputs and config: identical output"


def test_files_read_as_many_spans_give_the_same_shards_and_report(tmp_path, sample_corpora):
    import ray

    plain = {}
    for name in ("fortunes", "django_code", "kjv"):
        with gzip.open(sample_corpora[name], "rb") as f:
            lines = f.read().splitlines(keepends=True)[:100]
        plain[name] = tmp_path / f"{name}.jsonl"
        plain[name].write_bytes(b"".join(lines[:50]) + b'{"text": broken}\n' + b"".join(lines[50:]))
    raw = {"output": str(tmp_path / "whole" / "shards"), "seq_len": 64, "span_bytes": 0,
           "filters": {"c4": {"drop_lines_without_terminal_punct": False, "min_words_per_line": 0}},
           "tokenizer": {"vocab_size": 400, "sample_bytes": 200_000},
           "sources": {n: {"path": str(p), "kind": "code" if n == "django_code" else "prose"}
                       for n, p in plain.items()}}
    path = tmp_path / "prep.yaml"
    path.write_text(yaml.safe_dump(raw))
    whole = load_prep_config(path)
    split = load_prep_config(path, [f"output={tmp_path}/split/shards", "span_bytes=20000"])
    connect_ray(None, num_cpus=2, progress=False)
    try:
        reports = [run_prep(config, progress=False) for config in (whole, split)]
    finally:
        ray.shutdown()
    spans = [p for p in os.listdir(split.work) if p.startswith("ingest-")]
    assert len([f for f in os.listdir(os.path.join(split.work, spans[0])) if f.endswith(".done.json")]) >= 10
    assert read_manifest(split.output) == read_manifest(whole.output)
    for key in ("sources", "bad_input", "examples", "totals", "dedup"):
        assert reports[1][key] == reports[0][key], key
    assert {(os.path.basename(b["file"]), b["line"]) for b in reports[1]["bad_input"]["listed"]} == {
        (f"{n}.jsonl", 51) for n in plain}
