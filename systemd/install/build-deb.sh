#!/usr/bin/env bash
# `make deb`: builds farmgate_<version>_<arch>.deb with dpkg-deb from the same layout as `make install` (PREFIX=/usr).
#
#   FARMGATE_BIN  the farmgate binary (required; `make deb` builds it with --static-swift-stdlib, so that the package
#                 needs no Swift toolchain on the Pi)
#   DEB_OUT       where the .deb goes (default .build/deb)
#   DEB_VERSION   default: FarmgateVersion.current
#   DEB_COMPRESS  xz (default, the smallest download) or gzip (faster to build)
#   DEB_ARCH      default: dpkg --print-architecture (build on the Pi's architecture: arm64 for a 64-bit Raspberry Pi OS)
#   ALLOW_UNPACKAGED_LIBS=1  warn instead of failing when the binary needs a library no Debian package provides (the
#                 Swift runtime of a build without --static-swift-stdlib: such a package only runs where the toolchain is)
#
# Depends: is computed like dpkg-shlibdeps does: the package owning each library the binary needs (objdump -p, dpkg -S).
# The maintainer scripts create the user farmgate (groups dialout, gpio), enable the unit and load the udev rule;
# /etc/farmgate/agent.toml is a conffile (dpkg keeps local changes on upgrade).
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${FARMGATE_BIN:?FARMGATE_BIN must name the farmgate binary (make deb sets it)}"
DEB_OUT=${DEB_OUT:-.build/deb}
DEB_VERSION=${DEB_VERSION:-$(sed -n 's/.*static let current = "\(.*\)".*/\1/p' Sources/FarmgateWire/FarmgateVersion.swift)}
DEB_ARCH=${DEB_ARCH:-$(dpkg --print-architecture)}

stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
DESTDIR="$stage" PREFIX=/usr FARMGATE_BIN="$FARMGATE_BIN" systemd/install/install-site.sh >/dev/null

# Depends: the packages that own the libraries the binary is linked against.
packages=()
missing=()
for library in $(objdump -p "$FARMGATE_BIN" | awk '/NEEDED/ { print $2 }'); do
    path=$(ldconfig -p | awk -v lib="$library" '$1 == lib && !found { print $NF; found = 1 }')
    owner=""
    if [ -n "$path" ]; then
        owner=$(dpkg -S "$path" 2>/dev/null || dpkg -S "$(readlink -f "$path")" 2>/dev/null || true)
        owner=${owner%%:*}
    fi
    if [ -n "$owner" ]; then packages+=("$owner"); else missing+=("$library"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
    message="the binary needs libraries no Debian package provides: ${missing[*]}; build it with --static-swift-stdlib (make deb does)"
    if [ "${ALLOW_UNPACKAGED_LIBS:-0}" = 1 ]; then echo "build-deb: warning: $message" >&2; else echo "build-deb: $message" >&2; exit 1; fi
fi
# libc6 at the newest glibc symbol version the binary uses (packed relocations, DT_RELR, need 2.36), as
# dpkg-shlibdeps would say it.
glibc=$(objdump -p "$FARMGATE_BIN" | awk '
    $NF ~ /^GLIBC_[0-9]+\.[0-9]+$/ { split(substr($NF, 7), v, "."); n = v[1] * 1000 + v[2]; if (n > best) { best = n; name = v[1] "." v[2] } }
    $NF == "GLIBC_ABI_DT_RELR" && best < 2036 { best = 2036; name = "2.36" }
    END { print name }')
depends=$(printf '%s\n' "${packages[@]}" | sort -u | sed "s/^libc6\$/libc6 (>= ${glibc:-2.17})/" | paste -sd, - | sed 's/,/, /g')

mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: farmgate
Version: $DEB_VERSION
Architecture: $DEB_ARCH
Maintainer: Farmgate maintainers <farmgate@example.invalid>
Installed-Size: $size
Depends: $depends, passwd
Section: misc
Priority: optional
Description: Farmgate site agent for hydroponic water-quality sensors
 Reads pH, EC and temperature sensors (Atlas Scientific EZO, Modbus RTU, DS18B20,
 GPIO), commits every reading to a local SQLite buffer and forwards compressed
 batches to a farmgate-ingest, exactly once, over links that fail for days.
 Runs as the system user farmgate under systemd (Type=notify, watchdog, hardened).
CONTROL
echo /etc/farmgate/agent.toml > "$stage/DEBIAN/conffiles"
install -m 0755 systemd/install/deb/postinst systemd/install/deb/prerm systemd/install/deb/postrm "$stage/DEBIAN/"

mkdir -p "$DEB_OUT"
deb="$DEB_OUT/farmgate_${DEB_VERSION}_${DEB_ARCH}.deb"
dpkg-deb --root-owner-group -Z"${DEB_COMPRESS:-xz}" --build "$stage" "$deb" >/dev/null
echo "$deb"
