#!/bin/sh
# Installs the smartnic_ironic plugin for Debian's /usr/bin/python3 (the
# interpreter Ironic runs on) without PyPI: pip builds it offline with Debian's
# setuptools and installs it, entry points included, into a directory of its
# own; a .pth file puts that directory on Ironic's sys.path.
#
#   install.sh                    -> /usr/local/lib/smartnic-ironic + .pth file
#   install.sh --target DIR       -> DIR only (then run Ironic with PYTHONPATH=DIR)
#   install.sh --uninstall        -> removes what the default mode installed
#
# Needs: python3-pip, python3-setuptools (Debian 12: apt-get install python3-pip).
# Restart ironic-conductor (and clear $XDG_CACHE_HOME/python-entrypoints if the
# new entry points are not seen: stevedore caches them).
set -eu

PYTHON=${PYTHON:-/usr/bin/python3}
SRC=$(cd "$(dirname "$0")" && pwd)
TARGET=/usr/local/lib/smartnic-ironic
PTH=yes

case "${1:-}" in
  --target) TARGET=${2:?--target needs a directory}; PTH=no ;;
  --uninstall)
    site=$("$PYTHON" -c 'import site; print([p for p in site.getsitepackages() if p.startswith("/usr/local/")][0])')
    rm -rf "$TARGET" "$site/smartnic-ironic.pth"
    echo "removed $TARGET and $site/smartnic-ironic.pth"
    exit 0 ;;
  '') ;;
  *) echo "usage: $0 [--target DIR | --uninstall]" >&2; exit 2 ;;
esac

# Build from a copy: an in-tree build leaves build/ and *.egg-info behind.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/smartnic_ironic" "$work/"
find "$work" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$TARGET/smartnic_ironic" "$TARGET"/smartnic_ironic-*.dist-info
mkdir -p "$TARGET"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  --no-index --no-deps --no-build-isolation --target "$TARGET" "$work"

if [ "$PTH" = yes ]; then
  # Debian's python3 reads .pth files in /usr/local/lib/python3.X/dist-packages.
  site=$("$PYTHON" -c 'import site; print([p for p in site.getsitepackages() if p.startswith("/usr/local/")][0])')
  mkdir -p "$site"
  echo "$TARGET" > "$site/smartnic-ironic.pth"
  echo "installed into $TARGET ($site/smartnic-ironic.pth puts it on sys.path)"
else
  echo "installed into $TARGET (run Ironic with PYTHONPATH=$TARGET)"
fi
"$PYTHON" - "$TARGET" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from importlib import metadata
eps = [ep for ep in metadata.entry_points(group='ironic.hardware.interfaces.deploy') if ep.name == 'smartnic-streaming']
assert eps, 'entry point smartnic-streaming not found'
PY
