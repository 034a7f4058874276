#!/usr/bin/env bash
# Prints the path of a Python 3.12 interpreter, for the README's set-up commands and .ci/run:
#
#   PY=$(scripts/python312.sh) && "$PY" -m venv .venv
#
# Looks at $PYTHON312, then python3.12 / python3 / python on PATH (each only if it really runs 3.12: a
# pyenv shim of a version that is not the active one fails to run), then the 3.12.x versions of pyenv
# ($PYENV_ROOT, ~/.pyenv) and of /usr/local and /opt, newest first. pyenv's 3.12 need not be active.
# With none found it says what to do on stderr and exits 1.
set -euo pipefail

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

if [ -n "${PYTHON312:-}" ]; then
  if is_312 "$PYTHON312"; then echo "$PYTHON312"; exit 0; fi
  echo "PYTHON312=$PYTHON312 is not a Python 3.12 interpreter" >&2
  exit 1
fi
for name in python3.12 python3 python; do
  path=$(command -v "$name" 2>/dev/null) || continue
  if is_312 "$path"; then echo "$path"; exit 0; fi
done
for root in "${PYENV_ROOT:-$HOME/.pyenv}" "$HOME/.pyenv" /root/.pyenv /usr/local /opt; do
  for path in $(ls -d "$root"/versions/3.12*/bin/python3.12 "$root"/bin/python3.12 2>/dev/null | sort -rV); do
    if is_312 "$path"; then echo "$path"; exit 0; fi
  done
done
cat >&2 <<'EOF'
No Python 3.12 found (looked at $PYTHON312, python3.12 / python3 / python on PATH, and pyenv's versions).
lm2_jax needs Python 3.12 (jax 0.12 requires it). Install one, then run the command again:
  with pyenv:        pyenv install 3.12      (it need not be the active version)
  Debian / Ubuntu:   apt-get install python3.12 python3.12-venv
  other systems:     the installer from python.org
or point PYTHON312 at an existing 3.12 interpreter: PYTHON312=/path/to/python3.12
EOF
exit 1
