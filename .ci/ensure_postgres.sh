#!/usr/bin/env bash
# A PostgreSQL at 127.0.0.1:5432 with trust auth for the shared-state tests: use the one that
# answers, else start (and if need be install) Debian's.
set -euo pipefail
ready() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }
ready && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "installing postgresql (Debian package)" >&2
    $SUDO apt-get update -qq
    $SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi
version=$(ls /etc/postgresql | sort -V | tail -n1)
hba=/etc/postgresql/$version/main/pg_hba.conf
# Tests connect as postgres over loopback without a password.
if ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    $SUDO sed -i '1i local all all trust' "$hba"
fi
$SUDO pg_ctlcluster "$version" main start || $SUDO pg_ctlcluster "$version" main restart
for _ in $(seq 1 60); do
    ready && exit 0
    sleep 0.5
done
echo "PostgreSQL did not start at 127.0.0.1:5432" >&2
exit 1
