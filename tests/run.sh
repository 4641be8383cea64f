#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing
# (memcached, libmemcached-tools and iproute2 from Debian; pymemcache,
# meta-memcache and prometheus-client from PyPI),
# then runs every test. Tests start their own memcached and memdial
# processes on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v memcached >/dev/null || missing+=(memcached)
command -v memccapable >/dev/null || missing+=(libmemcached-tools)
command -v ss >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! python3 -c 'import pymemcache' 2>/dev/null; then
  echo "installing pymemcache"
  python3 -m pip install -q pymemcache
fi
if ! python3 -c 'import meta_memcache' 2>/dev/null; then
  echo "installing meta-memcache"
  python3 -m pip install -q meta-memcache
fi
if ! python3 -c 'import prometheus_client' 2>/dev/null; then
  echo "installing prometheus-client"
  python3 -m pip install -q prometheus-client
fi

cargo test --release "$@"
