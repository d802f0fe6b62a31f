#!/usr/bin/env bash
# Installs the store servers the test suite starts on loopback (Debian packages), plus
# protoc and the well-known protos (libprotobuf-dev) for the etcd client's build,
# openssl (test certificates), pgbouncer (the pooling-proxy test), faketime (the
# wrong-client-clock test), python3-kazoo (the kazoo interop test) and a JDK when javac
# is missing (the Curator-layout interop test). Idempotent: installs only what is
# missing.
#
#   scripts/install-stores.sh
set -euo pipefail

packages=(redis-server etcd-server etcd-client zookeeper python3-kazoo mariadb-server mariadb-client postgresql postgresql-client protobuf-compiler libprotobuf-dev pgbouncer faketime openssl)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ! command -v javac >/dev/null 2>&1; then
    missing+=(default-jdk-headless)
fi

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-stores: all store packages present"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-stores: missing ${missing[*]} and no apt-get here; install them with your package manager" >&2
    exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "install-stores: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi

echo "install-stores: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# Package scripts must not start the servers as system services: the tests start their
# own on free loopback ports.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod +x "$policy"
    created_policy=1
fi
status=0
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" || status=$?
if [ "$created_policy" -eq 1 ]; then
    "${sudo[@]}" rm -f "$policy"
fi
exit "$status"
