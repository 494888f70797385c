#!/usr/bin/env bash
# `make install-ingest`: installs the Farmgate ingest.
#
#   FARMGATE_INGEST_BIN  the farmgate-ingest binary to install (required; the Makefile passes the release build)
#   PREFIX               /usr/local by default
#   DESTDIR              a staging root: files go under it and the system is not touched (no user is created)
#   SYSCONFDIR           /etc by default; the configuration goes to $SYSCONFDIR/farmgate/ingest.toml
#                        (PREFIX and SYSCONFDIR are written into the unit's ExecStart=: whitespace, %, $, quotes, \
#                        and ; are refused, see check_unit_paths in install-lib.sh)
#   SYSTEMD_UNIT_DIR     where the unit goes (UNITDIR is the older name): $PREFIX/lib/systemd/system for PREFIX /usr
#                        and /usr/local (systemd reads both), else systemd's own directory (pkg-config's
#                        systemdsystemunitdir, else /usr/lib/systemd/system): systemd reads no unit under another prefix
#
# Installs: $PREFIX/bin/farmgate-ingest, the unit farmgate-ingest.service (ExecStart pointing at that binary and that
# configuration), a configuration as $SYSCONFDIR/farmgate/ingest.toml (or ingest.toml.example beside an existing one, which
# is never overwritten), the README and the ingest's examples (alert rules, nginx) under
# $PREFIX/share/doc/farmgate-ingest. Then, when run as root without DESTDIR, creates the system user farmgate-ingest,
# lets its group read the configuration (which may hold a database password) and reloads systemd.
set -euo pipefail
cd "$(dirname "$0")/../.."
. systemd/install/install-lib.sh

: "${FARMGATE_INGEST_BIN:?FARMGATE_INGEST_BIN must name the farmgate-ingest binary to install (make install-ingest sets it)}"
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
SYSCONFDIR=${SYSCONFDIR:-/etc}
check_unit_paths install-ingest
UNITDIR=$(unit_dir)
if [ ! -x "$FARMGATE_INGEST_BIN" ]; then
    echo "install-ingest: $FARMGATE_INGEST_BIN is not an executable; build it first (swift build -c release --product farmgate-ingest)" >&2
    exit 1
fi
root=${DESTDIR%/}

install -d -m 0755 "$root$PREFIX/bin" "$root$UNITDIR" "$root$SYSCONFDIR/farmgate" "$root$PREFIX/share/doc/farmgate-ingest/examples"
install -m 0755 "$FARMGATE_INGEST_BIN" "$root$PREFIX/bin/farmgate-ingest"
echo "installed $root$PREFIX/bin/farmgate-ingest"

install_unit systemd/farmgate-ingest.service "$root$UNITDIR/farmgate-ingest.service" farmgate-ingest
install_config systemd/install/ingest.toml "$root$SYSCONFDIR/farmgate/ingest.toml" 0640 \
    "SQLite in /var/lib/farmgate-ingest; set [storage] url for PostgreSQL"

install -m 0644 README.md "$root$PREFIX/share/doc/farmgate-ingest/README.md"
install -m 0644 examples/ingest.toml examples/ingest-alert-rules.toml examples/nginx-farmgate.conf "$root$PREFIX/share/doc/farmgate-ingest/examples/"

if [ -n "$DESTDIR" ]; then
    echo "skipped creating the user farmgate-ingest: DESTDIR is set (on the target: useradd --system --user-group --no-create-home --shell /usr/sbin/nologin farmgate-ingest)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "skipped creating the user farmgate-ingest: not root (run sudo make install-ingest)"
    exit 0
fi
if getent passwd farmgate-ingest >/dev/null; then
    echo "farmgate-ingest: the user farmgate-ingest exists"
else
    useradd --system --user-group --home-dir /var/lib/farmgate-ingest --no-create-home --shell /usr/sbin/nologin \
        --comment "Farmgate ingest" farmgate-ingest
    echo "farmgate-ingest: created the system user farmgate-ingest"
fi
chgrp farmgate-ingest "$SYSCONFDIR/farmgate/ingest.toml"
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
echo "next: edit $SYSCONFDIR/farmgate/ingest.toml, sudo systemctl enable --now farmgate-ingest, then farmgate-ingest farm create NAME"
