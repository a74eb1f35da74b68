"""How `pretrain prep` scales: wall time, MB/s and peak memory per process at ¼, ½ and 1 of a corpus, on the
embedded local Ray and on a simulated two-node Ray cluster.

    CORPUS_ROOT=/abs/corpora python benchmarks/corpus/build_large.py        # the ≥ 1 GB corpus (once)
    python benchmarks/dataprep_scaling.py --corpus /abs/corpora/jsonl --size-mb 0 --label full   # the whole corpus
    python benchmarks/dataprep_scaling.py --corpus /abs/corpora/jsonl --size-mb 50 --label 50mb  # a quick check

`--size-mb` samples that many MB of JSONL from the corpus (0: all of it) by a hash of each line, and the fractions
are nested samples of it (a line in ¼ is in ½), every source represented in each. Each sample is written as JSONL
files of at most `--file-mb` per source, the way large corpora ship (fixed-size shards), so a task's input is the
same size at every scale and only the number of files grows. Each prep runs in a fresh driver process while this
process samples, every `--interval` seconds, the resident memory of that driver and of every process under it (Ray's
GCS, raylets, workers, agents: each node of the simulated cluster is a child of the driver too): RSS, and RSS less
its shared pages (`private`: the shared ones are the object store's and memory-mapped files'). Writes
`benchmarks/results/dataprep_scaling_<label>.json`, a PNG of the curves beside it, and prints the markdown table of
docs/dataprep-performance.md.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CODE_SOURCES = {"kernel_code", "django_code", "go_source", "sympy_code", "ansible", "scientific_wheels",
                "npm_packages"}
SKIPPED_SOURCES = {"kernel_code"}  # 1.2 GB of one project's C: left out, as build_large.py leaves it out
SHAPES = ("embedded", "two_node")
ROLES = ("driver", "worker", "raylet", "gcs", "other")


def line_unit(source: str, index: int) -> float:
    """A deterministic uniform number in [0, 1) per line: the coin of the nested samples."""
    digest = hashlib.blake2b(f"{source}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def write_samples(corpus: str, size_mb: float, fractions: list[float], file_mb: float, out: str) -> dict:
    """`out/<fraction>/<source>/part-NNNNN.jsonl` for every fraction (reused when complete); returns the JSONL MB
    of each sample and the sources."""
    done = os.path.join(out, "samples.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    paths = sorted(p for p in glob.glob(os.path.join(corpus, "*.jsonl"))
                   if os.path.basename(p)[:-6] not in SKIPPED_SOURCES)
    total = sum(os.path.getsize(p) for p in paths)
    rate = 1.0 if size_mb <= 0 else min(1.0, size_mb * 1e6 / total)
    shutil.rmtree(out, ignore_errors=True)
    written = {str(f): 0 for f in fractions}
    for path in paths:
        source = os.path.basename(path)[:-6]
        files = {f: _ChunkWriter(os.path.join(out, str(f), source), file_mb * 1e6) for f in fractions}
        with open(path, "rb") as lines:
            for index, line in enumerate(lines):
                unit = line_unit(source, index)
                for f in fractions:
                    if unit < f * rate:
                        files[f].write(line)
                        written[str(f)] += len(line)
        for writer in files.values():
            writer.close()
    samples = {"jsonl_mb": {f: round(n / 1e6, 2) for f, n in written.items()}, "corpus_jsonl_mb": round(total / 1e6, 1),
               "sources": sorted(os.path.basename(p)[:-6] for p in paths)}
    with open(done, "w") as f:
        json.dump(samples, f)
    return samples


class _ChunkWriter:
    """JSONL lines into part-00000.jsonl, part-00001.jsonl, … of at most `limit` bytes each (a longer line alone)."""

    def __init__(self, folder: str, limit: float):
        self.folder, self.limit, self.index, self.size, self.file = folder, limit, 0, 0, None

    def write(self, line: bytes) -> None:
        if self.file is None or (self.size and self.size + len(line) > self.limit):
            if self.file:
                self.file.close()
                self.index += 1
            os.makedirs(self.folder, exist_ok=True)
            path = os.path.join(self.folder, f"part-{self.index:05d}.jsonl")
            self.file, self.size = open(path, "wb"), 0  # noqa: SIM115 (held across writes, closed by close())
        self.file.write(line)
        self.size += len(line)

    def close(self) -> None:
        if self.file:
            self.file.close()


def prep_config(inputs: str, output: str, sample_bytes: int, cpus: int):
    from dataprep.config import parse_prep_config

    sources = sorted(os.listdir(inputs))
    raw = {"name": "scaling", "output": output, "seq_len": 2048, "num_cpus": cpus,
           "filters": {"c4": {"drop_lines_without_terminal_punct": False, "min_words_per_line": 0}},
           "tokenizer": {"vocab_size": 32768, "sample_bytes": sample_bytes},
           "sources": {s: {"path": os.path.join(inputs, s), "kind": "code" if s in CODE_SOURCES else "prose"}
                       for s in sources}}
    return parse_prep_config(raw, source="benchmark")


def run_one(shape: str, inputs: str, output: str, sample_bytes: int, cpus: int, result: str) -> None:
    """In a fresh driver: start the cluster shape, run prep (timed), write the figures to `result`."""
    from cluster.local import apply_local_env

    apply_local_env()
    import ray

    from dataprep.pipeline import run_prep

    config = prep_config(inputs, output, sample_bytes, cpus)
    cluster = start_shape(shape, cpus)
    try:
        start = time.perf_counter()
        report = run_prep(config, progress=False)
        wall = time.perf_counter() - start
        nodes = len(ray.nodes())
    finally:
        ray.shutdown()
        if cluster:
            cluster.shutdown()
    with open(result, "w") as f:
        json.dump({"wall_s": wall, "nodes": nodes, "text_mb": report["totals"]["bytes_in"] / 1e6,
                   "docs_in": report["totals"]["docs_in"], "docs_kept": report["totals"]["docs_kept"],
                   "dedup": {k: v for k, v in report["dedup"].items() if k != "clusters"},
                   "stage_seconds": report["stage_seconds"]}, f)


def start_shape(shape: str, cpus: int, attempts: int = 6):
    """Start the cluster shape and connect this driver (untimed); returns the simulated cluster, if any. Retried: a
    raylet on a heavily loaded machine can miss Ray's 30 s registration deadline."""
    import ray

    from dataprep.executor import connect_ray

    for attempt in range(attempts):
        cluster = None
        try:
            if shape == "two_node":
                from cluster.testing import SimulatedCluster

                cluster = SimulatedCluster(nodes=1, gpus_per_node=0, cpus_per_node=cpus / 2, head_cpus=cpus / 2)
                ray.init(address=cluster.address, log_to_driver=False)
            connect_ray(None, cpus, progress=False)
            return cluster
        except Exception as e:
            print(f"starting {shape} failed ({e}); attempt {attempt + 1} of {attempts}", file=sys.stderr)
            ray.shutdown()
            if cluster:
                cluster.shutdown()
            if attempt + 1 == attempts:
                raise


def role_of(cmdline: list[str], name: str, is_driver: bool) -> str:
    text = " ".join(cmdline)
    if is_driver:
        return "driver"
    if "default_worker.py" in text or name.startswith("ray::") or text.startswith("ray::"):
        return "worker"
    if name == "raylet" or "/raylet" in text:
        return "raylet"
    if name == "gcs_server" or "gcs_server" in text:
        return "gcs"
    return "other"


def sample_tree(proc, interval: float) -> dict[int, dict]:
    """Until `proc` exits: per process under it, its role and peak RSS / private (RSS less shared) bytes."""
    import psutil

    root = psutil.Process(proc.pid)
    peaks: dict[int, dict] = {}
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                mem = p.memory_info()
                entry = peaks.get(p.pid)
                if entry is None:
                    entry = peaks[p.pid] = {"role": role_of(p.cmdline(), p.name(), p.pid == root.pid),
                                            "rss": 0, "private": 0, "names": set()}
                if mem.rss > entry["rss"] and entry["role"] == "worker":
                    entry["names"].add(" ".join(p.cmdline())[:80])  # a Ray worker titles itself after its task
                entry["rss"] = max(entry["rss"], mem.rss)
                entry["private"] = max(entry["private"], mem.rss - mem.shared)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        time.sleep(interval)
    return peaks


def measure(shape: str, fraction: float, inputs: str, work: str, sample_bytes: int, cpus: int,
            interval: float) -> dict:
    output = os.path.join(work, f"out-{shape}-{fraction}")
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(output + ".work", ignore_errors=True)
    result = output + ".json"
    load_before = os.getloadavg()[0]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, __file__, "--run-one", shape, inputs, output, str(sample_bytes),
                             str(cpus), result], cwd=os.path.dirname(HERE), env=env)
    peaks = sample_tree(proc, interval)
    if proc.wait() != 0:
        raise SystemExit(f"prep of {inputs} on {shape} failed (exit {proc.returncode})")
    with open(result) as f:
        figures = json.load(f)
    by_role = {}
    for role in ROLES:
        mine = [p for p in peaks.values() if p["role"] == role]
        if mine:
            by_role[role] = {"processes": len(mine), "peak_rss_mib": round(max(p["rss"] for p in mine) / 2**20),
                             "peak_private_mib": round(max(p["private"] for p in mine) / 2**20)}
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(output + ".work", ignore_errors=True)
    return {"shape": shape, "fraction": fraction, **figures, "mb_per_s": figures["text_mb"] / figures["wall_s"],
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2), "per_role": by_role,
            "processes": sorted(({"role": p["role"], "peak_rss_mib": round(p["rss"] / 2**20),
                                  "peak_private_mib": round(p["private"] / 2**20),
                                  "names": sorted(p["names"] - {"ray::IDLE"})[:8]} for p in peaks.values()),
                                key=lambda p: (p["role"], -p["peak_rss_mib"]))}


def verdicts(runs: list[dict]) -> dict:
    """Per shape: time at 1 over 4 × time at ¼ (≤ 1.25 is within the target) and peak memory at 1 over ¼ per role
    (≤ 1.2)."""
    out = {}
    for shape in {r["shape"] for r in runs}:
        mine = sorted((r for r in runs if r["shape"] == shape), key=lambda r: r["fraction"])
        lo, hi = mine[0], mine[-1]
        scale = hi["text_mb"] / lo["text_mb"]
        growth = {role: {k: round(hi["per_role"][role][k] / lo["per_role"][role][k], 3)
                         for k in ("peak_rss_mib", "peak_private_mib")}
                  for role in hi["per_role"] if role in lo["per_role"]}
        out[shape] = {"size_ratio": round(scale, 3), "time_over_linear": round(hi["wall_s"] / lo["wall_s"] / scale, 3),
                      "memory_growth": growth}
    return out


def markdown(runs: list[dict]) -> str:
    head = ("| cluster | fraction | text MB | wall s | MB/s | load before/after | peak RSS MiB: driver / worker "
            "(max) / raylet / GCS | private MiB: driver / worker (max) |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for r in sorted(runs, key=lambda r: (r["shape"], r["fraction"])):
        role = r["per_role"]
        rss = " / ".join(str(role.get(k, {}).get("peak_rss_mib", "-")) for k in ("driver", "worker", "raylet", "gcs"))
        private = " / ".join(str(role.get(k, {}).get("peak_private_mib", "-")) for k in ("driver", "worker"))
        rows.append(f"| {r['shape']} ({r['nodes']} node{'s' if r['nodes'] > 1 else ''}) | {r['fraction']} | "
                    f"{r['text_mb']:.1f} | {r['wall_s']:.1f} | {r['mb_per_s']:.2f} | {r['load_before']} / "
                    f"{r['load_after']} | {rss} | {private} |")
    return "\n".join([head, *rows])


def plot(runs: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for shape in SHAPES:
        mine = sorted((r for r in runs if r["shape"] == shape), key=lambda r: r["text_mb"])
        if not mine:
            continue
        size = [r["text_mb"] for r in mine]
        line, = left.plot(size, [r["wall_s"] for r in mine], "o-", label=f"{shape}: measured")
        left.plot(size, [mine[0]["wall_s"] * s / size[0] for s in size], ":", color=line.get_color(),
                  label=f"{shape}: linear from ¼")
        for role, marker in (("driver", "o"), ("worker", "s"), ("raylet", "^")):
            right.plot(size, [r["per_role"].get(role, {}).get("peak_rss_mib", 0) for r in mine], marker + "-",
                       label=f"{shape}: {role}")
    left.set(xlabel="text MB", ylabel="wall s", title="prep wall time")
    right.set(xlabel="text MB", ylabel="peak RSS MiB (largest process of the role)", title="peak memory per process")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=os.path.join(os.environ.get("CORPUS_ROOT", "corpora"), "jsonl"))
    parser.add_argument("--size-mb", type=float, default=0, help="MB of JSONL sampled from the corpus; 0: all")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--file-mb", type=float, default=16, help="largest input file of the samples")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the cluster, split evenly over two nodes")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--work", default="/tmp/prep-scaling")
    parser.add_argument("--label", default="full")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--note", default="", help="recorded with the figures (e.g. what else loaded the machine)")
    args = parser.parse_args()

    samples = write_samples(args.corpus, args.size_mb, args.fractions, args.file_mb,
                            os.path.join(args.work, f"samples-{args.size_mb:g}mb-{args.file_mb:g}"))
    smallest = min(samples["jsonl_mb"].values())
    sample_bytes = int(min(20e6, smallest * 1e6 / 4))  # the same tokenizer sample at every fraction
    runs: list[dict] = []
    base = os.path.join(args.results, f"dataprep_scaling_{args.label}")
    for shape in args.shapes:
        for fraction in args.fractions:
            inputs = os.path.join(args.work, f"samples-{args.size_mb:g}mb-{args.file_mb:g}", str(fraction))
            run = measure(shape, fraction, inputs, args.work, sample_bytes, args.cpus, args.interval)
            print(f"{shape:9s} {fraction:5g}: {run['text_mb']:8.1f} MB text, {run['wall_s']:7.1f} s, "
                  f"{run['mb_per_s']:.2f} MB/s, load {run['load_before']}/{run['load_after']}, "
                  f"peak RSS MiB {json.dumps({k: v['peak_rss_mib'] for k, v in run['per_role'].items()})}", flush=True)
            runs.append(run)
            save(base, args, samples, sample_bytes, runs)  # after every run: a cut-short benchmark keeps its figures
    print(markdown(runs))
    print(json.dumps(verdicts(runs), indent=2))
    print(f"wrote {base}.json and {base}.png")


def save(base: str, args: argparse.Namespace, samples: dict, sample_bytes: int, runs: list[dict]) -> None:
    figures = {"label": args.label, "note": args.note, "machine": f"{os.cpu_count()}-core CPU", "cpus": args.cpus,
               "corpus_jsonl_mb": samples["corpus_jsonl_mb"], "sample_jsonl_mb": samples["jsonl_mb"],
               "sources": samples["sources"], "file_mb": args.file_mb, "tokenizer_sample_bytes": sample_bytes,
               "command": " ".join(["python", os.path.relpath(__file__, os.path.dirname(HERE)), *sys.argv[1:]]),
               "runs": runs, "verdicts": verdicts(runs)}
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(figures, f, indent=2)
        f.write("\n")
    plot(runs, base + ".png", f"pretrain prep, {args.label}: {args.cpus} CPUs, samples {samples['jsonl_mb']} MB of "
         f"JSONL from a {samples['corpus_jsonl_mb']} MB corpus")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run-one":
        sys.path.insert(0, os.path.dirname(HERE))
        shape, inputs, output, sample_bytes, cpus, result = sys.argv[2:8]
        run_one(shape, inputs, output, int(sample_bytes), int(cpus), result)
    else:
        main()
