#!/bin/sh
# Creates the system user `farmgate` that runs the agent, in the groups that open serial ports (dialout) and GPIO chips
# (gpio); creates those groups when the system has none (plain Debian has no gpio group; the unit's
# SupplementaryGroups= needs both). Idempotent: an existing user only gains the groups. Run as root.
set -eu

for group in dialout gpio; do
    if ! getent group "$group" >/dev/null; then
        groupadd --system "$group"
        echo "farmgate: created the system group $group"
    fi
done

if getent passwd farmgate >/dev/null; then
    usermod --append --groups dialout,gpio farmgate
    echo "farmgate: the user farmgate exists; it is in the groups dialout and gpio"
else
    useradd --system --user-group --groups dialout,gpio --home-dir /var/lib/farmgate --no-create-home \
        --shell /usr/sbin/nologin --comment "Farmgate site agent" farmgate
    echo "farmgate: created the system user farmgate (groups dialout, gpio)"
fi
