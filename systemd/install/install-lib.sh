# Functions the install scripts share (sourced by install-site.sh and install-ingest.sh, from the repository's root).

# unit_dir: where the systemd units go. SYSTEMD_UNIT_DIR when set (UNITDIR is its older name); else, for PREFIX /usr
# and /usr/local, $PREFIX/lib/systemd/system (both are on systemd's unit path); for any other PREFIX, systemd's own
# directory (pkg-config --variable=systemdsystemunitdir systemd, else /usr/lib/systemd/system), because systemd reads
# no unit under /opt or another prefix.
unit_dir() {
    if [ -n "${SYSTEMD_UNIT_DIR:-}" ]; then echo "$SYSTEMD_UNIT_DIR"; return; fi
    if [ -n "${UNITDIR:-}" ]; then echo "$UNITDIR"; return; fi
    case "${PREFIX%/}" in
        /usr | /usr/local) echo "${PREFIX%/}/lib/systemd/system" ;;
        *)
            local found
            found=$(pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || true)
            echo "${found:-/usr/lib/systemd/system}"
            ;;
    esac
}

# check_unit_paths SCRIPT: exits 1, naming the variable, when PREFIX or SYSCONFDIR holds whitespace or a character that
# systemd reads specially in a unit's command line (`%` specifiers, `$` variables, quotes, `\`, `;`): both are written
# into the unit's ExecStart= (the binary and --config), which systemd would split or rewrite there, running another path.
# DESTDIR is never written into a unit (only the files go under it): it may hold any character.
check_unit_paths() {
    local name value
    for name in PREFIX SYSCONFDIR; do
        value=${!name}
        case "$value" in
            *[[:space:]%\$\"\'\\\;]*)
                echo "$1: $name='$value' contains whitespace or one of % \$ \" ' \\ ; which systemd would split or expand in the unit's ExecStart= line; choose a $name without them (DESTDIR may have them: it is not written into the unit)" >&2
                exit 1
                ;;
        esac
    done
}

# sed_replacement TEXT: TEXT escaped for the replacement side of a sed s### command.
sed_replacement() {
    printf '%s' "$1" | sed 's/[\\&#]/\\&/g'
}

# install_unit SOURCE DESTINATION BINARY: the unit SOURCE as DESTINATION, mode 0644, replaced in one rename, with its
# paths rewritten for this installation: /usr/local/bin/BINARY becomes $PREFIX/bin/BINARY, /etc/farmgate/ becomes
# $SYSCONFDIR/farmgate/ and /usr/local/share/doc/BINARY/ becomes $PREFIX/share/doc/BINARY/, so that the unit runs the
# binary installed with the configuration installed, and `systemctl help` opens the README installed with them.
install_unit() {
    local bin etc doc
    bin=$(sed_replacement "$PREFIX/bin/$3")
    etc=$(sed_replacement "$SYSCONFDIR/farmgate/")
    doc=$(sed_replacement "$PREFIX/share/doc/$3/")
    sed "s#/usr/local/bin/$3#$bin#g; s#/etc/farmgate/#$etc#g; s#/usr/local/share/doc/$3/#$doc#g" "$1" > "$2.tmp"
    chmod 0644 "$2.tmp"
    mv "$2.tmp" "$2"
    echo "installed $2"
}

# install_config SOURCE DESTINATION MODE NOTE: SOURCE as DESTINATION, unless one exists (an installer's edits are never
# overwritten): then as DESTINATION.example. NOTE follows the line saying it was installed.
install_config() {
    if [ -e "$2" ]; then
        install -m "$3" "$1" "$2.example"
        echo "kept the existing $2; the example is $2.example"
    else
        install -m "$3" "$1" "$2"
        echo "installed $2 ($4)"
    fi
}
