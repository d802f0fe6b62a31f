#!/usr/bin/env bash
# The project's test command: installs whatever is missing, then checks and tests
# everything. Run from anywhere:
#
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-stores.sh

# Everything the build and the tests need, checked before building so that a missing
# package is named at once instead of deep inside a build script or a test.
echo "== build and test needs"
problems=()
need() { # need PACKAGE DESCRIPTION COMMAND...
    local package=$1 what=$2
    shift 2
    if ! "$@" >/dev/null 2>&1; then
        problems+=("$what: install the Debian package $package (scripts/install-stores.sh installs it)")
    fi
}
on_path() { # on_path NAME: on PATH, in an sbin, or in Postgres's versioned bin dir
    command -v "$1" && return 0
    local candidate
    for candidate in /usr/sbin/"$1" /sbin/"$1" /usr/lib/postgresql/*/bin/"$1"; do
        [ -x "$candidate" ] && return 0
    done
    return 1
}
protos=$(mktemp -d)
printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\n' >"$protos/probe.proto"
need protobuf-compiler "protoc does not run (etcd-client's build script calls it)" protoc --version
need libprotobuf-dev "protoc cannot find google/protobuf/descriptor.proto (etcd-client's build imports the well-known protos)" \
    protoc --proto_path="$protos" --descriptor_set_out=/dev/null "$protos/probe.proto"
rm -rf "$protos"
need redis-server "redis-server is not on PATH" on_path redis-server
need etcd-server "etcd is not on PATH" on_path etcd
need etcd-client "etcdctl is not on PATH (the etcdctl interop tests)" on_path etcdctl
need zookeeper "ZooKeeper's jar is missing" test -r /usr/share/java/zookeeper.jar
need default-jdk-headless "java/javac are not on PATH (ZooKeeper and the Curator-layout client)" on_path javac
need mariadb-server "mariadbd is not on PATH" on_path mariadbd
need mariadb-client "the mariadb client is not on PATH" on_path mariadb
need postgresql "postgres/initdb are not installed" on_path initdb
need postgresql-client "pg_isready is not on PATH" on_path pg_isready
need pgbouncer "pgbouncer is not on PATH (the pooling-proxy test)" on_path pgbouncer
need faketime "faketime is not on PATH (the wrong-client-clock test)" on_path faketime
need openssl "openssl is not on PATH (test certificates)" on_path openssl
need python3-kazoo "Debian's python3 cannot import kazoo (the kazoo interop test)" /usr/bin/python3 -c "import kazoo"
if [ ${#problems[@]} -gt 0 ]; then
    printf 'test.sh: cannot build or test:\n' >&2
    printf '  - %s\n' "${problems[@]}" >&2
    exit 1
fi
echo "all present"

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
echo "== docs build without warnings, every feature on"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --quiet
echo "== a third-party driver runs the suite without any store client"
# Outside the workspace, with the conformance crate's default features off: protoc
# must not be needed (PROTOC fails), and no store client may be in its tree.
third_party=conformance/third-party
cp Cargo.lock "$third_party/Cargo.lock"
clients=$(cd "$third_party" && cargo tree --target-dir ../../target/third-party -e normal,dev --prefix none |
    grep -E '^(sqlx|etcd-client|redis|zookeeper-client|fencelock-sql|fencelock-redis|fencelock-etcd|fencelock-zookeeper|fencelock-redlock|fencelock) ' || true)
if [ -n "$clients" ]; then
    echo "the store-independent suite pulls store clients:" >&2
    echo "$clients" >&2
    exit 1
fi
(cd "$third_party" && PROTOC=/bin/false cargo test --target-dir ../../target/third-party --quiet)
echo "== every library crate packages (in dependency order, each built from its package)"
cargo package --workspace --exclude fencelock-bench --exclude fencelock-examples --allow-dirty --quiet
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
