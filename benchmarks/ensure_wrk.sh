#!/bin/sh
# Install wrk (the load generator `make bench` uses) when it is missing.
set -e
command -v wrk >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "wrk is missing and apt-get is not available: install wrk (https://github.com/wg/wrk)" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing wrk (Debian package)" >&2
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq wrk
command -v wrk >/dev/null 2>&1
