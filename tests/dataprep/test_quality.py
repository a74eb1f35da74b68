"""Model-based quality filtering on real text: `pretrain prep train-quality` trains a fastText classifier that tells two
sample sources apart on documents it never saw; prep keeps each source's best fraction above the threshold, exactly
the documents a full sort of directly computed scores picks, with documents adding up, the histograms in the report
and the same shards at another actor count; a tiny BERT classifier scores documents through Ray Data actors as it
does when called directly; every wrong input is one message and exit code 2."""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dataprep.config import PrepConfig, QualityConfig, load_prep_config
from dataprep.executor import connect_ray
from dataprep.filters.quality_model import FastTextScorer
from dataprep.filters.quality_train import held_out
from dataprep.pipeline import run_prep
from dataprep.quality import kept_by_cut, score_order, score_parts, source_cut
from dataprep.report import draw_report, format_table
from dataprep.shards import read_manifest
from dataprep.stages import PrepRun
from dataprep.stats import PrepStats
from orchestrator.cli import main
from orchestrator.errors import SpecError

HELD_OUT = 0.25
TRAIN_ARGS = ["--held-out", str(HELD_OUT), "--epochs", "20", "--lr", "0.5", "--buckets", "20000", "--quiet"]


def _texts(path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_corpora):
    """A classifier of encyclopedia leads (positive) against fortune-cookie quips (negative)."""
    root = tmp_path_factory.mktemp("quality")
    model = root / "quality.bin"
    assert main(["prep", "train-quality", "--positive", str(sample_corpora["wiki_vital_en"]), "--negative",
                 str(sample_corpora["fortunes"]), "-o", str(model), *TRAIN_ARGS]) == 0
    return root, model, json.loads((root / "quality.bin.json").read_text())


def test_trained_classifier_separates_two_sources_on_held_out_documents(trained, sample_corpora, tmp_path):
    _, model, reported = trained
    scorer = FastTextScorer(str(model))
    right = held = positives = 0
    for source, positive in (("wiki_vital_en", True), ("fortunes", False)):
        texts = [t for t in _texts(sample_corpora[source]) if held_out(t, HELD_OUT)]
        right += int(((scorer(texts) > 0.5) == positive).sum())
        held += len(texts)
        positives += len(texts) * positive
    assert reported["held_out"] == held and 0.15 < held / reported["documents"] < 0.35
    assert reported["accuracy"] == pytest.approx(right / held), "the reported accuracy is the model's on the split"
    majority = max(positives, held - positives) / held
    assert reported["majority_baseline"] == pytest.approx(majority)
    assert right / held >= majority + (1 - majority) / 2, "at least halfway from guessing the majority to perfect"
    again = tmp_path / "again.bin"
    assert main(["prep", "train-quality", "--positive", str(sample_corpora["wiki_vital_en"]), "--negative",
                 str(sample_corpora["fortunes"]), "-o", str(again), *TRAIN_ARGS]) == 0
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (model, again)]
    assert digest[0] == digest[1], "the same inputs train the same model file"


def test_cut_keeps_exactly_the_best_fraction_with_ties_broken_by_key(tmp_path):
    rng = np.random.default_rng(0)
    files, scores, keys = [], [], []
    for i, n in enumerate((500, 1, 733)):
        score = np.round(rng.random(n), 2).astype(np.float32)  # 101 values: many ties
        key = np.sort(rng.choice(10**9, n, replace=False)) + i * 10**9
        path = tmp_path / f"s{i}.parquet"
        pq.write_table(pa.table({"key": key, "score": score}), path)
        files.append(str(path))
        scores.append(score)
        keys.append(key)
    score, key = np.concatenate(scores), np.concatenate(keys)
    for fraction in (0.0, 0.001, 0.1, 0.37, 0.5, 0.999, 1.0):
        cut = source_cut(files, fraction)
        keep = int(fraction * len(score) + 0.5)
        best = np.lexsort((key, -score))[:keep]
        expected = np.zeros(len(score), bool)
        expected[best] = True
        assert np.array_equal(kept_by_cut(score_order(score), key, cut), expected), fraction
        if 0 < keep < len(score):
            assert cut["score"] == pytest.approx(float(score[best[-1]]))


def _prep_yaml(root, model, sample_corpora, **quality) -> str:
    config = {
        "output": str(root / "shards"), "seq_len": 64, "num_cpus": 2, "mix": {"val_fraction": 0.0},
        "filters": {"gopher_quality": {"enabled": False}, "gopher_repetition": {"enabled": False},
                    "c4": {"enabled": False}, "language": {"enabled": False},
                    "quality": {"model": str(model), **quality}},
        "tokenizer": {"vocab_size": 300, "sample_bytes": 100_000},
        "sources": {"wiki": {"path": str(sample_corpora["wiki_vital_en"])},
                    "fortunes": {"path": str(sample_corpora["fortunes"])},
                    "code": {"path": str(sample_corpora["django_code"]), "kind": "code"}},
    }
    path = root / "prep.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _parts(directory: str) -> pa.Table:
    parts = sorted(glob.glob(f"{directory}/*.parquet"))
    return pa.concat_tables(pq.read_table(p, columns=["key", "text"]) for p in parts)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    connect_ray(None, num_cpus=2, progress=False)
    yield
    ray.shutdown()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.slow
@pytest.mark.xdist_group("dataprep_ray")
def test_prep_keeps_the_best_fraction_per_source_and_reports_the_scores(trained, sample_corpora):
    root, model, _ = trained
    threshold, fraction = 0.1, 0.6
    config = load_prep_config(_prep_yaml(root, model, sample_corpora, threshold=threshold, keep_fraction=fraction))
    stats = PrepStats()
    report = run_prep(config, stats=stats, progress=False)

    [selected] = glob.glob(os.path.join(config.work, "select-*"))
    [scores_dir] = glob.glob(os.path.join(config.work, "quality-scores-*"))
    [kept_dir] = [d for d in glob.glob(os.path.join(config.work, "quality-*")) if d != scores_dir]
    before, after = _parts(selected), _parts(kept_dir)
    scorer = FastTextScorer(str(model))
    kept_keys = set(after.column("key").to_pylist())
    for name, s in report["sources"].items():
        assert s["docs_in"] == s["docs_kept"] + sum(s["removed"].values()), name
    source_of = {t: n for n in config.sources for t in glob.glob(f"{selected}/{n}-*.parquet")}
    by_source: dict[str, pa.Table] = {}
    for part, name in source_of.items():
        table = pq.read_table(part, columns=["key", "text"])
        by_source[name] = pa.concat_tables([by_source[name], table]) if name in by_source else table
    for name in ("wiki", "fortunes"):
        keys, texts = by_source[name].column("key").to_numpy(), by_source[name].column("text").to_pylist()
        direct = scorer(texts)
        written = _parts_scores(scores_dir, f"{name}-")
        assert np.array_equal(written[0], keys) and np.array_equal(written[1], direct), "side scores are per doc"
        expected = np.zeros(len(keys), bool)
        expected[np.lexsort((keys, -direct))[:int(fraction * len(keys) + 0.5)]] = True
        expected &= direct >= np.float32(threshold)
        assert kept_keys & set(keys.tolist()) == set(keys[expected].tolist()), name
        q = report["sources"][name]["quality"]
        assert q["scored"] == len(keys) == sum(q["histogram"].values())
        assert report["sources"][name]["removed"].get("quality_threshold", 0) == int((direct < threshold).sum())
        assert f"quality {name}: {len(keys):,} scored" in format_table(report)
    code = by_source["code"].column("key").to_pylist()
    assert set(code) <= kept_keys and "quality" not in report["sources"]["code"], "code is not scored"
    assert len(after) == len(before) - sum(s["removed"].get(r, 0) for s in report["sources"].values()
                                           for r in ("quality_threshold", "quality_fraction"))
    live = stats.snapshot()["counters"]
    assert live["removed_quality_fraction"] == report["totals"]["removed"]["quality_fraction"]
    assert live["docs_kept"] == report["totals"]["docs_kept"]
    assert report["quality"] == {"type": "fasttext", "model": str(model), "threshold": threshold,
                                 "keep_fraction": fraction, "histogram_width": 0.05}

    import matplotlib.image

    without = root / "without.png"
    draw_report({**report, "quality": {}}, str(without))
    widths = [matplotlib.image.imread(p).shape[1] for p in (os.path.join(config.output, "report.png"), without)]
    assert widths[0] > widths[1], "report.png has the quality panel"

    manifest = read_manifest(config.output)
    for done in (scores_dir, kept_dir):
        shutil.rmtree(done)
    again = load_prep_config(root / "prep.yaml", [f"output={root}/again/shards", f"work_dir={config.work}",
                                                  "filters.quality.actors=1"])
    fresh = run_prep(again, progress=False)
    assert read_manifest(again.output) == manifest, "scored again by one actor instead of two: the same shards"
    assert fresh["sources"]["wiki"]["quality"] == report["sources"]["wiki"]["quality"]


def _parts_scores(directory: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    tables = [pq.read_table(p) for p in sorted(glob.glob(f"{directory}/{prefix}*"))]
    table = pa.concat_tables(tables)
    return table.column("key").to_numpy(), table.column("score").to_numpy()


def _tiny_classifier(directory: str, texts: list[str]) -> None:
    """A randomly initialised two-layer BERT regression head and a WordPiece tokenizer trained on the texts."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=64).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=1, initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(directory)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.slow
@pytest.mark.xdist_group("dataprep_ray")
def test_hugging_face_classifier_scores_through_ray_data_as_called_directly(sample_corpora, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    wiki, fortunes = _texts(sample_corpora["wiki_vital_en"])[:24], _texts(sample_corpora["fortunes"])[:17]
    model_dir = str(tmp_path / "classifier")
    _tiny_classifier(model_dir, wiki + fortunes)
    parts = []
    for i, texts in enumerate((wiki, fortunes)):
        parts.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(pa.table({"key": np.arange(len(texts)) + 1000 * i, "text": texts}), parts[-1])
    q = QualityConfig(model=model_dir, type="hf", batch_size=5, actors=1)  # each actor imports torch and transformers
    score_parts(parts, str(tmp_path / "scores"), q, PrepRun(PrepConfig(), PrepStats(), False, [], 2))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    texts = wiki + fortunes
    assert max(len(tokenizer(t).input_ids) for t in texts) > 64, "some documents are truncated"
    with torch.inference_mode():
        direct = np.array([model(**tokenizer(t, truncation=True, max_length=64, return_tensors="pt")).logits[0, 0]
                           for t in texts], np.float32)
    written = np.concatenate([pq.read_table(tmp_path / "scores" / os.path.basename(p)).column("score").to_numpy()
                              for p in parts])
    assert np.allclose(written, direct, rtol=1e-4, atol=1e-5), np.abs(written - direct).max()
    assert direct.std() > 0.1 * np.abs(direct).mean(), "the documents' scores differ"


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_wrong_inputs_are_one_message_and_exit_2(trained, sample_corpora, tmp_path, capsys):
    root, model, _ = trained
    wiki, fortunes = str(sample_corpora["wiki_vital_en"]), str(sample_corpora["fortunes"])
    bad_label = tmp_path / "bad.jsonl"
    bad_label.write_text(json.dumps({"text": "a document", "label": "maybe"}) + "\n")
    out = tmp_path / "model.bin"
    for args, message in (
        (["--positive", str(tmp_path / "missing.jsonl"), "--negative", fortunes], "missing.jsonl' is not a file"),
        (["--labelled", fortunes], r"fortunes.jsonl.gz:1: no label field 'label'; set --label-field"),
        (["--labelled", str(bad_label)], r"bad.jsonl:1: label field 'label' holds 'maybe'; allowed"),
        (["--positive", wiki], "needs positive and negative documents; got 200 positive and 0 negative"),
        (["--positive", wiki, "--negative", fortunes, "--held-out", "1.5"], "--held-out: got 1.5, allowed"),
        ([], "no training data"),
    ):
        code, err = _run(capsys, ["prep", "train-quality", *args, "-o", str(out)])
        assert code == 2 and message.replace("\\", "") in err.replace("\\", "") and "Traceback" not in err, err
        assert err.count("\n") == 1 and not out.exists(), err

    prep = _prep_yaml(tmp_path, model, sample_corpora)
    for overrides, match in (
        ([f"filters.quality.model={tmp_path / 'none.bin'}"], r"filters.quality.model: .*none.bin' is not a file"),
        (["filters.quality.threshold=1.5"], r"filters.quality.threshold: 1.5 is out of range .* 0 to 1"),
        (["filters.quality.keep_fraction=0"], r"filters.quality.keep_fraction: 0 would remove every document"),
        ([f"filters.quality.model={root}", "filters.quality.type=hf"], r"holds no config.json"),
        ([f"filters.quality.model={fortunes}"], r"filters.quality.model: .*not a fastText model"),
    ):
        with pytest.raises(SpecError, match=match):
            load_prep_config(prep, overrides)
    code, err = _run(capsys, ["prep", prep, "filters.quality.threshold=-0.5"])
    assert code == 2 and "filters.quality.threshold: -0.5 is out of range" in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "shards"), "nothing written"
