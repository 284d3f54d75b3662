"""Files written so that a reader, or a run killed at any moment, never sees half of one."""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike, durable: bool = False):
    """Yields a fresh temporary path beside ``path`` to write the file to; when the block ends,
    the file is renamed over ``path`` (a crash leaves the old file or the new one, never a torn
    one), or removed if the block raised. ``durable``: fsynced first, and the rename after, so
    that it survives a power cut too. The file gets the umask's permissions, as any other file
    of the run (safetensors writes its files 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A dot name ending in .tmp: what the CLI clears from a run folder that a killed run left.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        try:
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError:  # a filesystem without Unix permissions: its own rules apply
            pass
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask() -> int:
    """The process's umask: from /proc on Linux, else by setting it and putting it straight
    back (for that instant another thread's new file would get the widest permissions)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
