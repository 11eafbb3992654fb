#!/bin/sh
# Install the seqr-router offline bundle into a new virtual environment, with no network.
#
#   ./install.sh TARGET [PYTHON]      e.g. ./install.sh /opt/seqr-router /usr/bin/python3.11
#
# 1. every file of the bundle is checked against SHA256SUMS (the bundle's own sha256, carried
#    beside the tarball, vouches for SHA256SUMS: check that first, see README.md);
# 2. pip installs requirements.txt from wheels/ only (--no-index) and refuses any file whose
#    sha256 is not the one pinned there (--require-hashes); no pip configuration is read.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target=${1:?usage: install.sh TARGET [PYTHON]}
python=${2:-python3.11}

cd "$here"
echo "==> verifying bundle checksums"
sha256sum --check --strict --quiet SHA256SUMS
listed=$(sed 's/^[0-9a-f]*  //' SHA256SUMS | sort)
present=$(find . -type f ! -name SHA256SUMS | sed 's|^\./||' | sort)
if [ "$listed" != "$present" ]; then
    echo "install.sh: the bundle holds files SHA256SUMS does not list (or lacks listed ones)" >&2
    exit 1
fi

"$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || {
    echo "install.sh: $python is not Python 3.11 (the bundle's wheels are cp311)" >&2; exit 1; }

echo "==> creating $target"
"$python" -m venv "$target"
echo "==> installing from wheels/ (no index, hashes required)"
PIP_CONFIG_FILE=/dev/null "$target/bin/python" -m pip install --quiet --no-index --no-cache-dir \
    --disable-pip-version-check --require-hashes --find-links "$here/wheels" -r "$here/requirements.txt"
"$target/bin/seqr" --help >/dev/null
echo "==> installed: $target/bin/seqr (next: README.md, 'Keys')"
