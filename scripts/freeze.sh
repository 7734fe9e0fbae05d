#!/usr/bin/env bash
# Freeze one commit of chainlora for a long experiment: `git archive` of COMMIT (default HEAD) into DEST, with
# the commit written into chainlora/COMMIT so every run's metrics.json records it (`code.commit`).
#   scripts/freeze.sh /work/frozen/abc123 [COMMIT]
#   PYTHONPATH=/work/frozen/abc123/src .venv/bin/chainlora sweep configs/sweeps/....yaml
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:?usage: scripts/freeze.sh DEST [COMMIT]}
commit=$(git rev-parse --short=10 "${2:-HEAD}")
[ -e "$dest" ] && { echo "error: $dest exists" >&2; exit 2; }
mkdir -p "$dest"
git archive "$commit" src configs | tar -x -C "$dest"
echo "$commit" > "$dest/src/chainlora/COMMIT"
echo "frozen $commit in $dest: PYTHONPATH=$dest/src"
