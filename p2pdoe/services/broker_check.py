"""Checks a Mosquitto configuration before the broker starts, for what Mosquitto itself lets pass
quietly: with a persistence folder it cannot write it starts, runs and only logs an error at its
first save, so every queued QoS 1 message would be lost to a crash. Also the files it must read.

`python -m p2pdoe.services.broker_check CONFIG` prints one line per problem and exits 1, or exits 0
(systemd `ExecStartPre`, a container's entrypoint, `p2pdoe demo --secure`).
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

_FILES = ("password_file", "acl_file", "cafile", "certfile", "keyfile", "bridge_cafile")


def settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


def problems(config: Path) -> list[str]:
    try:
        s = settings(config.read_text(encoding="utf-8"))
    except OSError as exc:
        return [f"cannot read the broker configuration {config}: {exc.strerror}"]
    found = [
        f"{key} {name} does not exist"
        for key in _FILES
        for name in s.get(key, [])
        if not Path(name).is_file()
    ]
    if s.get("persistence", ["false"])[-1] == "true":
        folder = Path(s.get("persistence_location", ["."])[-1])
        user = s.get("user", ["mosquitto"])[-1]
        why = _unwritable(folder, user)
        if why is not None:
            found.append(f"persistence_location {folder} {why}: the broker would lose its store on a crash")
    return found


def _unwritable(folder: Path, user: str) -> str | None:
    """Why the broker, running as `user` (it drops to it when started as root), cannot write in
    `folder`; None if it can."""
    try:
        st = folder.stat()
    except OSError:
        return "does not exist"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if os.geteuid() != 0:  # not root: Mosquitto keeps this user
        return None if os.access(folder, os.W_OK | os.X_OK) else "is not writable by this user"
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return f"cannot be checked: no user {user!r} here"
    if account.pw_uid == 0:
        return None
    groups = {account.pw_gid, *(g for g in os.getgrouplist(user, account.pw_gid))}
    wx = stat.S_IWUSR | stat.S_IXUSR
    if st.st_uid == account.pw_uid and st.st_mode & wx == wx:
        return None
    if st.st_gid in groups and st.st_mode & (stat.S_IWGRP | stat.S_IXGRP) == stat.S_IWGRP | stat.S_IXGRP:
        return None
    if st.st_mode & (stat.S_IWOTH | stat.S_IXOTH) == stat.S_IWOTH | stat.S_IXOTH:
        return None
    return f"is not writable by user {user!r}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m p2pdoe.services.broker_check MOSQUITTO_CONF", file=sys.stderr)
        return 2
    found = problems(Path(args[0]))
    for line in found:
        print(f"broker configuration: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
