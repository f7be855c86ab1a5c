"""The one folder the proxy's nginx workers may enter: their temp folders and the golden-probe metrics they serve.

Started as root, nginx runs its workers as an unprivileged user (`nobody`), who must not enter the server's workdir:
it holds key_file.json, config and logs, and it (or a folder above it, like a 0700 home or pytest's temp folders)
is often closed to other users anyway. So what the workers read and write lives outside it, in
`/tmp/servekit-proxy-UID-HASH`, named after the workdir so that every command finds it (whatever its TMPDIR: the
proxy and `servekit probe` run from different shells). Started as root, the
folder belongs to root with the worker's group and mode 0710: the workers may open what is in it but not list it or
write to it, and no other account may enter; nginx makes its temp folders inside it the workers' own (0700).
Started by anyone else, nginx's workers run as that user and the folder is theirs, 0700.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from servekit.core.errors import ServerError
from servekit.store.catalog import write_atomically

WORKER_USER = "nobody"  # every Linux has it; it owns no files, so granting it one folder grants nothing else
PARENT = Path("/tmp")  # where the workers' folders are: every user may enter it


def worker_account() -> tuple[str, str, int, int] | None:
    """(user, group, uid, gid) nginx's workers run as when servekit is root; None otherwise (they stay the invoking
    user, and nginx ignores a `user` directive)."""
    if os.geteuid() != 0:
        return None
    import grp
    import pwd

    try:
        user = pwd.getpwnam(WORKER_USER)
    except KeyError:
        raise ServerError(
            f"no user {WORKER_USER!r} on this machine: the proxy's nginx workers drop root to it; create it "
            f"(useradd --system --no-create-home {WORKER_USER}) or start servekit as another user"
        ) from None
    try:
        group = grp.getgrgid(user.pw_gid).gr_name
    except KeyError:
        raise ServerError(f"{WORKER_USER}'s group {user.pw_gid} has no name in /etc/group: add one") from None
    return user.pw_name, group, user.pw_uid, user.pw_gid


def folder(workdir: Path) -> Path:
    """Where the workers of the proxy of the server in `workdir` read and write (whether or not it exists)."""
    digest = hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:16]
    return PARENT.resolve() / f"servekit-proxy-{os.geteuid()}-{digest}"


def owned(path: Path) -> bool:
    """`path` is a real folder (not a link) of this user: one another user put there first is never used."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()


def prepare(workdir: Path) -> Path:
    """Creates (or keeps) the workers' folder of `workdir` with the owner, group and mode above; returns it."""
    path = folder(workdir)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not owned(path):
            raise ServerError(
                f"{path} exists but is not a folder of this user: remove it (someone else made it), then start again"
            ) from None
    account = worker_account()
    if account is None:
        path.chmod(0o700)
        return path
    user, _, uid, gid = account
    os.chown(path, 0, gid)
    path.chmod(0o710)
    for step in [*reversed(path.parents), path]:
        if not enterable_by(step, uid, gid):
            raise ServerError(
                f"the proxy's nginx workers run as {user} and cannot enter {step} (mode "
                f"{stat.S_IMODE(step.stat().st_mode):04o}): let every user enter it (chmod o+x), as /tmp usually is"
            )
    return path


def enterable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether a process of `uid` with primary group `gid` (and no other) may enter the folder `path`."""
    info = path.stat()
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def publish(workdir: Path, name: str, text: str) -> None:
    """Replaces the file `name` in the workers' folder of `workdir` atomically, if that folder exists (a proxy runs
    or ran there); nginx serves it from there."""
    path = folder(workdir)
    if owned(path):
        write_atomically(path / name, text)


def remove(workdir: Path) -> None:
    """Removes the workers' folder of `workdir` (after its nginx stopped), if it is this user's."""
    path = folder(workdir)
    if owned(path):
        shutil.rmtree(path, ignore_errors=True)
