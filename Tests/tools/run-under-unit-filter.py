#!/usr/bin/python3
"""Runs a program under the system call filter that a systemd unit file asks for, the way systemd would install it.

Usage: run-under-unit-filter.py UNIT PROGRAM [ARGS...]

Reads the unit's SystemCallFilter= lines in order (the first allow list sets the base, `~` lines remove, later allow lines
add back), expands @groups with `systemd-analyze syscall-filter`, makes every other call fail with
SystemCallErrorNumber= (EPERM), and adds MemoryDenyWriteExecute=yes's rules (no mapping both writable and executable, no
mprotect to executable). Then it execs PROGRAM. Needs python3-seccomp (libseccomp's bindings). A test tool: no running
systemd is needed, so the real binaries can be checked against the shipped unit on any machine.
"""
import errno
import os
import subprocess
import sys

import seccomp

PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def expand(name, cache={}):
    if not name.startswith("@"):
        return {name}
    if name not in cache:
        out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True).stdout
        calls = set()
        for line in out.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith("#"):
                calls |= expand(item)
        cache[name] = calls
    return cache[name]


def unit_settings(path):
    filters, mdwe, error_number = [], False, "EPERM"
    for raw in open(path):
        line = raw.strip()
        if line.startswith("SystemCallFilter="):
            filters.append(line.split("=", 1)[1])
        elif line == "MemoryDenyWriteExecute=yes":
            mdwe = True
        elif line.startswith("SystemCallErrorNumber="):
            error_number = line.split("=", 1)[1]
    return filters, mdwe, error_number


def main():
    unit, program = sys.argv[1], sys.argv[2:]
    filters, mdwe, error_number = unit_settings(unit)
    if not filters:
        sys.exit(f"{unit}: no SystemCallFilter= line")
    allowed = None
    for value in filters:
        deny = value.startswith("~")
        names = set()
        for item in value.lstrip("~").split():
            names |= expand(item)
        if allowed is None:
            if deny:
                sys.exit(f"{unit}: the first SystemCallFilter= is a deny list; this tool handles allow lists")
            allowed = names
        elif deny:
            allowed -= names
        else:
            allowed |= names
    allowed.add("execve")  # systemd installs the filter before it execs the service
    conditional = {"mmap", "mmap2", "mprotect", "pkey_mprotect", "shmat"} if mdwe else set()
    code = getattr(errno, error_number, errno.EPERM)
    fltr = seccomp.SyscallFilter(defaction=seccomp.ERRNO(code))
    for name in sorted(allowed - conditional):
        try:
            fltr.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # a name this architecture does not have
    for name in sorted(allowed & conditional):
        try:
            if name in ("mmap", "mmap2"):
                # Allowed unless both writable and executable.
                fltr.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, PROT_WRITE, 0))
                fltr.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, 0))
            elif name == "shmat":
                fltr.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, 0))
            else:
                fltr.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, 0))
        except (RuntimeError, ValueError):
            pass
    fltr.load()
    os.execv(program[0], program)


main()
