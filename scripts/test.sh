#!/usr/bin/env bash
# The project's test command: installs whatever is missing, then checks and tests
# everything. Run from anywhere:
#
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-stores.sh

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== each SQL store feature alone"
for feature in sqlite postgres mysql; do
    cargo clippy -p fencelock-sql --no-default-features --features "$feature" -- -D warnings
done
echo "== facade without default features (feature-off errors)"
cargo test -p fencelock --no-default-features --quiet
echo "== doc tests"
cargo test --workspace --doc --quiet
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --profile ci
else
    cargo test --workspace
fi

# Every server the harness starts runs from a temp dir named fencelock-<server>-*; none
# may outlive the run. Report only: nothing here stops a process.
echo "== no server outlives the run"
tmp=$(dirname "$(mktemp -u)")
leftover=$(pgrep -af -- "$tmp/fencelock-(redis|etcd|zookeeper|mariadb|postgres)-" || true)
if [ -n "$leftover" ]; then
    echo "servers started by the tests are still running:" >&2
    echo "$leftover" >&2
    exit 1
fi
echo "none left"
