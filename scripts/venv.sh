#!/usr/bin/env bash
# Create or refresh .venv so it matches pyproject.toml, with the tested versions of constraints.txt.
# Idempotent: a no-op (well under a second) when neither file changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.ilr-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "[ilr] installing dependencies into .venv (first run takes a few minutes)..." >&2
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
# pip's own exit status decides; its noise about missing local index folders is filtered out
set -o pipefail
.venv/bin/python -m pip install --quiet --no-compile -c constraints.txt -e '.[dev]' 2> >(grep -v 'is ignored: it is neither' >&2)
# Byte-compile what was installed, on every core: pip compiles one file at a time (40-47 s of a new .venv's
# install here, 31-33 s this way). Like pip, skip the few files written for newer Pythons (compileall's exit
# status says only that).
for dir in $(.venv/bin/python -c "import sysconfig; print(*{sysconfig.get_path(k) for k in ('purelib', 'platlib')})"); do
  .venv/bin/python -m compileall -q -j 0 "$dir" >/dev/null 2>&1 || true
done
echo "$want" > "$stamp"
