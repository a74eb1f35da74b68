"""Downstream evaluation through lm-evaluation-harness: `pretrain eval` and the training loop's `eval` section.

The tiny model trains on real shards for a few steps in one process, with a local multiple-choice task scored in
the loop (history.jsonl records it). Its checkpoint is exported, and a local generation task is written whose
targets are, for half the prompts, the exported model's own greedy continuation (so exact match is neither 0 nor 1
when the two sides agree). transformers' model under the harness's own Hugging Face backend (HFLM) is the
reference: `pretrain eval` of the checkpoint under dp2 and under tp2 (torchrun, 2 ranks) gives its accuracy and
exact match, and for every (context, choice) request the same log-likelihood (within 1e-6 of its size, fp32: each
rank batches its share of the requests, and tp2 sums partial products over the ranks); the adapter over the whole
model, in this process, matches it request by request too (within 1e-6 of its size: it batches them otherwise),
including an empty context, rolling windows and generation.
Task data is read from JSONL written here, through a datasets cache in the test's directory: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main as pretrain
from parallel.callbacks import read_history
from tests.helpers import REPO, TINY_RUN, torchrun
from tests.parallel.test_hf_layouts import byte_tokenizer
from tests.shards import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("downstream-eval")]

STEPS = 12
MC = [("In the beginning God created the", [" heaven", " xqzv", " table"], 0),
      ("And God said, Let there be", [" light", " zzzz", " kqkq"], 0),
      ("The quick brown", [" fox", " qqq"], 0),
      ("Python is a programming", [" language", " xxxxx", " ztz"], 0),
      ("And the earth was without", [" form", " qxqx"], 0),
      ("He said unto", [" them", " qqqq", " zzz"], 1),
      ("import os", ["\nimport sys", " qq"], 0)]
PROMPTS = ["In the beginning God", "And God said", "The king of", "def main", "It is a", "Let there"]
TASKS = "demo_mc,demo_gen"


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp),
            "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _one_process(tmp: Path) -> dict[str, str]:
    return {**_env(tmp), "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}


def _task(directory: Path, name: str, rows: list[dict], body: str) -> None:
    """A harness task over a JSONL file, its datasets cache inside the test's directory."""
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {directory / 'hf-cache'}\ntest_split: test\n{body}")


MC_BODY = ('output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
           'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
GEN_BODY = ('output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
            'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
            'metric_list:\n  - metric: exact_match\n')


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Shards, local tasks, a trained checkpoint (with the multiple-choice task in the loop) and its HF export."""
    tmp = tmp_path_factory.mktemp("downstream")
    shards = write_shards(tmp / "shards", seq_len=64, rows=200)
    byte_tokenizer(shards / "tokenizer.json")
    tasks = tmp / "tasks"
    tasks.mkdir()
    _task(tasks, "demo_mc", [{"question": q, "choices": c, "answer": a} for q, c, a in MC], MC_BODY)
    ckpt = tmp / "ckpt"
    train = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "train", str(REPO / "examples" / "tiny.yaml"), *TINY_RUN,
         f"data.path={shards}", f"checkpoint.dir={ckpt}", "parallel.backend=native", "resources.gpus_per_node=1",
         f"schedule.steps={STEPS}", "schedule.eval_every=6", "metrics.enabled=false", "optim.lr=1e-2",
         "eval.tasks=demo_mc", f"eval.include_path={tasks}", "eval.every=4", "eval.batch_size=4"],
        env=_one_process(tmp), capture_output=True, text=True, timeout=300, cwd=tmp)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-5000:]
    assert pretrain(["export", str(ckpt), str(tmp / "hf")]) == 0
    _task(tasks, "demo_gen", _generation_rows(tmp / "hf"), GEN_BODY)
    return {"tmp": tmp, "ckpt": ckpt, "hf": tmp / "hf", "tasks": tasks}


def _generation_rows(hf: Path) -> list[dict]:
    """Prompts whose target is, every other one, the exported model's greedy continuation up to a newline."""
    from tokenizers import Tokenizer

    from parallel.generate import SamplingConfig, generate
    from parallel.hf import load_hf_model

    tokenizer = Tokenizer.from_file(str(hf / "tokenizer.json"))
    tokens = generate(load_hf_model(str(hf)), [tokenizer.encode(p).ids for p in PROMPTS],
                      SamplingConfig(max_new_tokens=8, temperature=0)).tokens
    own = [tokenizer.decode([t for t in row if t != 256]).split("\n")[0] for row in tokens]
    return [{"prompt": p, "target": text if i % 2 == 0 else " not this"} for i, (p, text) in
            enumerate(zip(PROMPTS, own, strict=True))]


@pytest.fixture(scope="module")
def reference(run) -> dict:
    """transformers' model under the harness's HFLM: scores and samples of both tasks, and the HFLM itself."""
    from lm_eval.models.huggingface import HFLM

    from parallel.downstream import TaskSettings, run_tasks, scores_of
    from parallel.eval_tasks import task_manager

    settings = TaskSettings(TASKS.split(","))
    hflm = HFLM(pretrained=str(run["hf"]), device="cpu", dtype="float32", batch_size=4)
    results = run_tasks(hflm, settings, task_manager(settings.tasks, str(run["tasks"]), "tasks"), log_samples=True)
    return {"scores": scores_of(results), "samples": results["samples"], "hflm": hflm}


def _loglikelihoods(samples: dict) -> list[float]:
    """Each multiple-choice document's log-likelihood of each choice, in document order."""
    docs = sorted(samples["demo_mc"], key=lambda s: s["doc_id"])
    return [float(resp[0][0]) for doc in docs for resp in doc["resps"]]


def assert_within_float32(ours: list[float], theirs: list[float]) -> None:
    """Log-likelihoods summed in another order move by their last float32 bits: within 1e-6 of their size (1e-6
    absolute is finer than float32 resolves past 8; one step at 16-32 is 3.8e-6)."""
    assert len(ours) == len(theirs), (ours, theirs)
    assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(ours, theirs, strict=True)), (ours, theirs)


def test_scores_in_the_loop_land_in_history(run) -> None:
    evals = read_history(str(run["ckpt"] / "history.jsonl"))["eval"]
    scored = {e["step"]: e["scores"] for e in evals if e["scores"]}
    assert sorted(scored) == [4, 8, 12]
    assert all(set(s) == {"demo_mc/acc"} and 0 <= s["demo_mc/acc"] <= 1 for s in scored.values())
    held_out = {e["step"]: e for e in evals if e["batches"]}
    assert sorted(held_out) == [6, 12] and held_out[12]["scores"] == scored[12]  # one record for both at step 12


def test_whole_model_adapter_matches_hflm_request_by_request(run, reference) -> None:
    from lm_eval.api.instance import Instance

    from parallel.hf import load_hf_model
    from parallel.lm_eval_adapter import PretrainLM, WholeModel

    hflm = reference["hflm"]
    ours = PretrainLM(WholeModel(load_hf_model(str(run["hf"]))), str(run["hf"] / "tokenizer.json"), eos_id=256,
                      max_length=hflm.max_length, batch_size=3)
    pairs = [Instance("loglikelihood", {}, (q, c), 0) for q, choices, _ in MC for c in choices]
    pairs.append(Instance("loglikelihood", {}, ("", "And God said"), 0))  # an empty context: the prefix token
    ours_ll, theirs_ll = ours.loglikelihood(pairs), hflm.loglikelihood(pairs)
    assert [g for _, g in ours_ll] == [g for _, g in theirs_ll]
    # Batches of 3 against HFLM's 4 pad and group the requests differently, so the float32 sums run in another
    # order: equal to within float32's resolution at each value's size, as under two ranks below.
    assert_within_float32(ours=[x for x, _ in ours_ll], theirs=[x for x, _ in theirs_ll])
    text = "In the beginning God created the heaven and the earth. " * 3  # longer than max_length: 3 windows
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert_within_float32(ours=ours.loglikelihood_rolling(rolling), theirs=hflm.loglikelihood_rolling(rolling))
    asks = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}), 0)
            for p in PROMPTS]
    assert ours.generate_until(asks) == hflm.generate_until(asks)


@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_pretrain_eval_matches_hflm_under_two_ranks(run, reference, tp: int) -> None:
    out = run["tmp"] / f"eval-tp{tp}.json"
    cmd = [*torchrun(2), "-m", "orchestrator.cli", "eval", str(run["ckpt"]), "--tasks", TASKS,
           "--include-path", str(run["tasks"]), "--batch-size", "2", "--tp", str(tp), "--output", str(out),
           "--log-samples"]
    result = subprocess.run(cmd, env=_env(run["tmp"]), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    document = json.loads(out.read_text())
    assert document["scores"] == reference["scores"]
    assert 0 < document["scores"]["demo_gen/exact_match"] < 1
    ours, theirs = _loglikelihoods(document["samples"]), _loglikelihoods(reference["samples"])
    assert len(ours) == sum(len(c) for _, c, _ in MC)
    # Batches of another size pad differently, and the CPU's matmul kernels may then sum in another order.
    assert_within_float32(ours=ours, theirs=theirs)
    history = read_history(str(run["ckpt"] / "history.jsonl"))["eval"]
    assert history[-1]["scores"]["demo_mc/acc"] == document["scores"]["demo_mc/acc"]  # the loop's, at that step


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "demo_mc,no_such_task_xyz"], r"unknown task 'no_such_task_xyz'.*lm-eval ls tasks"),
    (["--tasks", "demo_mc", "--include-path", "/nonexistent/tasks"], r"include path: /nonexistent/tasks is not a "
                                                                      r"directory"),
    (["--tasks", " , "], r"--tasks: no task named"),
    (["--tasks", "demo_mc", "--limit", "-1", "--tp", "0"], r"--limit: -1, must be ≥ 0.*--tp: 0, must be at least 1"),
], ids=["unknown-task", "missing-include-path", "no-task", "bad-numbers"])
def test_wrong_eval_input_is_one_message_and_exit_2(run, capsys, args: list[str], message: str) -> None:
    if "--include-path" not in args:
        args = [*args, "--include-path", str(run["tasks"])]
    output = run["tmp"] / "never.json"
    assert pretrain(["eval", str(run["ckpt"]), *args, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not output.exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["schedule.eval_every=0", "eval.every=0", "eval.tasks=demo_mc"], r"eval.every: 0 with schedule.eval_every=0"),
    (["parallel.pp=2", "resources.gpus_per_node=2", "eval.tasks=demo_mc"], r"eval.tasks: downstream evaluation in "
                                                                          r"the loop needs a plain forward"),
    (["eval.tasks=demo_mc", "eval.include_path=/nonexistent/tasks"], r"eval.include_path: '/nonexistent/tasks' is "
                                                                     r"not a directory"),
    (["eval.limit=-3"], r"eval.limit"),
], ids=["never-runs", "pipeline", "missing-include-path", "negative-limit"])
def test_wrong_eval_section_is_refused(capsys, overrides: list[str], message: str) -> None:
    assert pretrain(["validate", str(REPO / "examples" / "tiny.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
