#!/usr/bin/env bash
# Real English text, offline, from Debian's documentation packages: the Python manual, the Linux kernel's
# Documentation/ and Perl's manual pages, turned into plain prose by scripts/doc_text.py.
#   bash scripts/doc-text.sh OUT_DIR [--held-out-bytes N]
# OUT_DIR gets train.jsonl ({"text", "source"} a document), held-out.txt (other documents, for perplexity),
# stats.json and packages.txt (the exact package versions). Needs apt-get and dpkg (Debian or Ubuntu), and
# root for `apt-get update` where the package lists are empty; nothing is installed.
set -euo pipefail
out=${1:?usage: bash scripts/doc-text.sh OUT_DIR [--held-out-bytes N]}
shift
python=${PYTHON:-python3}
[ -n "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial)" ] || apt-get update -qq
# the metapackages name the release's current versions (bookworm: python3.11-doc, linux-doc-6.1)
packages=(
  "$(apt-cache depends python3-doc | awk '/Depends: python3\.[0-9]+-doc/ {print $2; exit}')"
  "$(apt-cache depends linux-doc | awk '/Depends: linux-doc-[0-9]/ {print $2; exit}')"
  perl-doc
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" && mkdir "$work/debs" && chmod 777 "$work/debs"  # apt-get download runs as _apt, which must write here
(cd "$work/debs" && apt-get download -q "${packages[@]}" >/dev/null)
mkdir -p "$out"
for deb in "$work"/debs/*.deb; do
  dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb"
  dpkg -x "$deb" "$work/root"
done >"$out/packages.txt"
"$python" "$(dirname "$0")/doc_text.py" "$work/root" "$out" "$@"
