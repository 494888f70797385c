# Functions the install scripts share (sourced by install-site.sh and install-ingest.sh, from the repository's root).

# install_unit SOURCE DESTINATION SED_SCRIPT: the unit SOURCE rewritten by SED_SCRIPT (its paths), mode 0644, replaced
# in one rename.
install_unit() {
    sed "$3" "$1" > "$2.tmp"
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
