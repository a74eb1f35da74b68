"""Prep and training on an object store: a real S3-protocol server (moto's) on 127.0.0.1 with IAM authentication
on, reached through pyarrow's own S3 client with an endpoint override, as a user reaches MinIO or AWS.

Prep reads its corpus from the store and writes shards, manifest and report there; a prep killed midway resumes;
the training loader streams those shards (with and without a local cache) exactly as it reads a local copy, and
`pretrain train` trains on them and resumes from its checkpoint. A refused credential or a missing bucket is one
readable error, exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import yaml

from dataprep import filesystem
from dataprep.shards import read_manifest
from orchestrator.errors import DataError
from parallel.hf import shard_tokenizer
from parallel.loader import ShardLoader
from tests.helpers import TINY_RUN, losses

REPO = Path(__file__).resolve().parents[2]
BUCKET = "corpus"

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dataprep_ray")]


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """The server, a user allowed everything on S3, and the environment that points a client at it: the AWS SDK's
    own variables (AWS_ENDPOINT_URL_S3, the key pair), nothing of this project's."""
    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the port it binds
    server.start()
    url = "http://{}:{}".format(*server.get_host_and_port())
    iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="prep")
    key = iam.create_access_key(UserName="prep")["AccessKey"]
    iam.put_user_policy(UserName="prep", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    requests.post(f"{url}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()  # signed requests only
    env = {"AWS_ENDPOINT_URL_S3": url, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    filesystem._filesystem.cache_clear()
    pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True).create_dir(BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    filesystem._filesystem.cache_clear()
    server.stop()


def _upload(local: Path, key: str) -> str:
    """Put a file in the bucket with a client built from the URI and the environment, as a user's would be."""
    s3, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    with s3.open_output_stream(f"{BUCKET}/{key}", compression=None) as f:
        f.write(local.read_bytes())
    return f"s3://{BUCKET}/{key}"


def _prep(config: Path, *overrides: str, env: dict, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "orchestrator.cli", "prep", str(config), *overrides, "--quiet"]
    full = {**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    log = kwargs.pop("log", None)
    if log:
        return subprocess.Popen(command, env=full, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=log.open("w"))
    return subprocess.run(command, env=full, capture_output=True, text=True, timeout=540, **kwargs)


@pytest.fixture(scope="session")
def prep_config(store, tmp_path_factory, sample_corpora):
    root = tmp_path_factory.mktemp("object-prep")
    _upload(sample_corpora["wiki_vital_es"], "in/prose/wiki_vital_es.jsonl.gz")
    sources = {"code": {"path": _upload(sample_corpora["django_code"], "in/code/django_code.jsonl.gz"),
                        "kind": "code"},
               "es": {"path": f"s3://{BUCKET}/in/prose/*.jsonl.gz", "kind": "code"}}  # a glob over keys
    config = {"name": "store", "output": f"s3://{BUCKET}/shards", "work_dir": str(root / "work"), "seq_len": 64,
              "num_cpus": 2, "rows_per_shard": 400, "mix": {"val_fraction": 0.05, "max_epochs": 1},
              "dedup": {"near": False}, "tokenizer": {"vocab_size": 320, "sample_bytes": 50_000},
              "sources": sources}
    path = root / "prep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def prepped(store, prep_config):
    """A prep into the store, killed once its first task has finished, then run again to the end."""
    work = Path(yaml.safe_load(prep_config.read_text())["work_dir"])
    log = prep_config.parent / "killed.log"
    proc = _prep(prep_config, env=store, log=log)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if work.exists() and any(work.glob("ingest-*/*.done.json")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_with_manifest = filesystem.exists(f"s3://{BUCKET}/shards/manifest.json")
    ingest = next(p for p in work.iterdir() if p.name.startswith("ingest-"))
    before = {p.name: p.stat().st_mtime_ns for p in ingest.iterdir() if ".tmp-" not in p.name}  # whole files
    done = _prep(prep_config, env=store)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"killed_with_manifest": killed_with_manifest, "ingest_before": before, "ingest": ingest,
            "output": f"s3://{BUCKET}/shards"}


def test_a_killed_prep_resumes_and_leaves_whole_shards_and_the_report_in_the_store(prepped):
    assert not prepped["killed_with_manifest"], "the killed run wrote no manifest"
    after = {p.name: p.stat().st_mtime_ns for p in prepped["ingest"].iterdir()}
    assert prepped["ingest_before"] and all(after[name] == mtime for name, mtime in prepped["ingest_before"].items()), \
        "the rerun did not redo finished stage tasks"
    output = prepped["output"]
    manifest = read_manifest(output)
    entries = [e for split in manifest["splits"].values() for e in split["shards"]]
    assert len(manifest["splits"]["train"]["shards"]) >= 2
    assert manifest["sources"]["es"]["tokens"] > 0 and manifest["sources"]["code"]["tokens"] > 0
    for entry in entries:
        data = filesystem.read_bytes(filesystem.join(output, entry["file"]))
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
    names = set(filesystem.list_dir(output))
    assert names == {e["file"] for e in entries} | {"manifest.json", "tokenizer.json", "report.json", "report.png"}
    report = json.loads(filesystem.read_bytes(filesystem.join(output, "report.json")))
    assert report["conservation"]["ok"] and report["config_hash"] == manifest["config_hash"]


def _batches(loader: ShardLoader, steps: int) -> list[np.ndarray]:
    try:
        return [np.concatenate([b.inputs.numpy() for b in loader.next_step()]) for _ in range(steps)]
    finally:
        loader.close()


def test_the_loader_streams_the_same_rows_as_a_local_copy_and_resumes_exactly(prepped, tmp_path):
    output = prepped["output"]
    local = tmp_path / "local"
    local.mkdir()
    for name in filesystem.list_dir(output):
        filesystem.download(filesystem.join(output, name), str(local / name))
    tokenizer = shard_tokenizer(output)  # what export and generate take from the shards
    assert Path(tokenizer.tokenizer_json).read_bytes() == (local / "tokenizer.json").read_bytes()
    assert tokenizer.eos_id == shard_tokenizer(str(local)).eos_id is not None
    settings = dict(seq_len=32, micro_batch_size=4, grad_accum=2, seed=7)
    expected = _batches(ShardLoader(str(local), **settings), 6)
    streamed = ShardLoader(output, **settings)
    first = _batches(streamed, 3)
    resumed = ShardLoader(output, prefetch=0, **settings)
    resumed.load_state_dict(streamed.state_dict())
    assert all((a == b).all() for a, b in zip(first + _batches(resumed, 3), expected, strict=True))
    cache = tmp_path / "cache"
    cached = ShardLoader(output, cache_dir=str(cache), **settings)
    deadline = time.time() + 30
    while any(a is None for a in cached.shards.local) and time.time() < deadline:
        time.sleep(0.05)
    assert all((a == b).all() for a, b in zip(_batches(cached, 6), expected, strict=True))
    manifest = read_manifest(output)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{e['sha256']}.arrow" for e in
                                                            manifest["splits"]["train"]["shards"])


def test_train_reads_the_shards_from_the_store_and_resumes_from_its_checkpoint(prepped, store, tmp_path):
    env = {**os.environ, **store, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}

    def train(steps: int, directory: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "train", str(REPO / "examples" / "tiny.yaml"), *TINY_RUN,
             f"data.path={prepped['output']}", f"data.cache_dir={tmp_path / 'cache'}", f"checkpoint.dir={directory}",
             "parallel.backend=native", "resources.gpus_per_node=1", "metrics.enabled=false",
             "schedule.lr_schedule=constant", f"schedule.steps={steps}"],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    stopped = train(4, str(tmp_path / "ckpt"))
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    resumed = train(6, str(tmp_path / "ckpt"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    straight = train(6, str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    assert sorted(losses(resumed.stdout)) == [5, 6]
    assert {s: v for s, v in losses(straight.stdout).items() if s > 4} == losses(resumed.stdout)


def test_a_refused_credential_is_one_error_naming_the_uri(store, prep_config):
    done = _prep(prep_config, env={**store, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"sources.code.path: s3://{BUCKET}/in/code/django_code.jsonl.gz: the store refused the credentials" \
        in done.stderr


def test_a_missing_bucket_is_one_error_for_prep_and_for_train(store, prep_config, tmp_path):
    done = _prep(prep_config, "output=s3://no-such-bucket/shards", env=store)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "s3://no-such-bucket/shards" in done.stderr and "the bucket does not exist" in done.stderr
    train = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "train", str(REPO / "examples" / "tiny.yaml"), *TINY_RUN,
         "data.path=s3://no-such-bucket/shards", "resources.gpus_per_node=1"],
        env={**os.environ, **store, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
        cwd=tmp_path)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "data.path: s3://no-such-bucket/shards/manifest.json: the bucket 'no-such-bucket' does not exist" \
        in train.stderr


def test_every_reader_reads_the_same_records_from_the_store_as_from_a_disk(store, tmp_path, sample_corpora):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataprep.readers import read_records
    from dataprep.readers.base import split_file

    with gzip.open(sample_corpora["wiki_vital_es"], "rb") as f:
        lines = f.read().splitlines(keepends=True)[:40]
    texts = [json.loads(line)["text"] for line in lines]
    local = {"plain.jsonl": b"".join(lines), "doc.txt": texts[0].encode()}
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / "t.parquet",
                   row_group_size=10)
    local["t.parquet"] = (tmp_path / "t.parquet").read_bytes()
    for name, data in local.items():
        (tmp_path / name).write_bytes(data)
        _upload(tmp_path / name, f"readers/{name}")
    assert filesystem.list_files(f"s3://{BUCKET}/readers/*.jsonl") == [f"s3://{BUCKET}/readers/plain.jsonl"]
    for name in local:
        remote = f"s3://{BUCKET}/readers/{name}"
        spans = split_file(remote, "auto", "text", 4096)
        assert spans == split_file(str(tmp_path / name), "auto", "text", 4096)
        for span in spans:
            got = list(read_records(remote, "auto", "text", "id", 10**7, False, span))
            assert got == list(read_records(str(tmp_path / name), "auto", "text", "id", 10**7, False, span))
            assert got and all(r.text for r in got), name


def test_the_cache_refuses_a_shard_whose_object_differs_from_the_manifest(store, tmp_path):
    from tests.shards import write_shards

    shards = write_shards(tmp_path / "shards", seq_len=32, rows=200)
    for name in os.listdir(shards):
        _upload(shards / name, f"changed/{name}")
    # same size and layout, other rows: only the checksum tells them apart
    _upload(shards / "train-00001.arrow", "changed/train-00000.arrow")
    settings = dict(seq_len=32, micro_batch_size=4, seed=1)
    assert len(_batches(ShardLoader(f"s3://{BUCKET}/changed", **settings), 2)) == 2, "streaming reads it"
    cached = ShardLoader(f"s3://{BUCKET}/changed", cache_dir=str(tmp_path / "cache"), prefetch=0, **settings)
    cached.shards._copier.join(timeout=30)
    with pytest.raises(DataError, match=r"s3://corpus/changed/train-00000.arrow: sha256 \w+ does not match "
                                        r"manifest.json"):
        _batches(cached, 1)
    assert not any(name.startswith(read_manifest(shards)["splits"]["train"]["shards"][0]["sha256"])
                   for name in os.listdir(tmp_path / "cache")), "the changed copy is not kept"
