#!/usr/bin/env bash
# `make install`: installs the Farmgate site agent.
#
#   FARMGATE_BIN  the farmgate binary to install (required; the Makefile passes the release build)
#   PREFIX        /usr/local by default (/usr for the .deb)
#   DESTDIR       a staging root: files go under it and the system is not touched (no user is created)
#   SYSCONFDIR    /etc by default; the configuration goes to $SYSCONFDIR/farmgate/agent.toml
#                 (PREFIX and SYSCONFDIR are written into the unit's ExecStart=: whitespace, %, $, quotes, \ and ; are
#                 refused, see check_unit_paths in install-lib.sh)
#   SYSTEMD_UNIT_DIR  where the unit goes (UNITDIR is the older name): $PREFIX/lib/systemd/system for PREFIX /usr and
#                 /usr/local (systemd reads both), else systemd's own directory (pkg-config's systemdsystemunitdir, else
#                 /usr/lib/systemd/system): systemd reads no unit under /opt or another prefix
#   UDEVDIR       /usr/lib/udev/rules.d for PREFIX=/usr, else /etc/udev/rules.d (udev reads no /usr/local)
#
# Installs: $PREFIX/bin/farmgate, the unit farmgate.service (ExecStart and ExecReload pointing at that binary and at
# $SYSCONFDIR/farmgate/agent.toml), the example
# configuration as $SYSCONFDIR/farmgate/agent.toml (or agent.toml.example beside an existing one, which is never
# overwritten), a udev rule giving /dev/gpiochip* to the group gpio, $PREFIX/lib/farmgate/create-user, the README and the
# example site configurations under $PREFIX/share/doc/farmgate. Then, when run as root without DESTDIR, creates the
# system user farmgate in the groups dialout and gpio and reloads systemd.
set -euo pipefail
cd "$(dirname "$0")/../.."
. systemd/install/install-lib.sh

: "${FARMGATE_BIN:?FARMGATE_BIN must name the farmgate binary to install (make install sets it)}"
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
SYSCONFDIR=${SYSCONFDIR:-/etc}
check_unit_paths install
UNITDIR=$(unit_dir)
if [ -z "${UDEVDIR:-}" ]; then
    if [ "$PREFIX" = /usr ]; then UDEVDIR=/usr/lib/udev/rules.d; else UDEVDIR=/etc/udev/rules.d; fi
fi
if [ ! -x "$FARMGATE_BIN" ]; then
    echo "install: $FARMGATE_BIN is not an executable; build it first (make release)" >&2
    exit 1
fi
root=${DESTDIR%/}

install -d -m 0755 "$root$PREFIX/bin" "$root$UNITDIR" "$root$SYSCONFDIR/farmgate" "$root$UDEVDIR" \
    "$root$PREFIX/lib/farmgate" "$root$PREFIX/share/doc/farmgate/examples"
install -m 0755 "$FARMGATE_BIN" "$root$PREFIX/bin/farmgate"
echo "installed $root$PREFIX/bin/farmgate"

install_unit systemd/farmgate.service "$root$UNITDIR/farmgate.service" farmgate
install_config systemd/install/agent.toml "$root$SYSCONFDIR/farmgate/agent.toml" 0644 "an example: enroll, then add your sensors"

install -m 0644 systemd/install/60-farmgate-gpio.rules "$root$UDEVDIR/60-farmgate-gpio.rules"
install -m 0755 systemd/install/create-user.sh "$root$PREFIX/lib/farmgate/create-user"
install -m 0644 README.md "$root$PREFIX/share/doc/farmgate/README.md"
install -m 0644 systemd/install/copyright "$root$PREFIX/share/doc/farmgate/copyright"
install -m 0644 examples/site-*.toml "$root$PREFIX/share/doc/farmgate/examples/"

if [ -n "$DESTDIR" ]; then
    echo "skipped creating the user farmgate: DESTDIR is set (the target system creates it: $PREFIX/lib/farmgate/create-user, or the package's postinst)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "skipped creating the user farmgate: not root (run sudo $PREFIX/lib/farmgate/create-user, or sudo make install)"
    exit 0
fi
"$PREFIX/lib/farmgate/create-user"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    udevadm control --reload-rules 2>/dev/null && udevadm trigger --subsystem-match=gpio 2>/dev/null || true
fi
config_option=""
if [ "$SYSCONFDIR/farmgate/agent.toml" != /etc/farmgate/agent.toml ]; then config_option=" -c $SYSCONFDIR/farmgate/agent.toml"; fi
echo "next: sudo farmgate enroll$config_option <ingest URL> <token>, add sensors to $SYSCONFDIR/farmgate/agent.toml, sudo farmgate doctor$config_option, sudo systemctl enable --now farmgate"
