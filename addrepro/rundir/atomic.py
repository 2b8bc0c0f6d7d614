"""Atomic file writes: a kill never leaves half a file that looks valid."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

# The temporary files of atomic_write, ``.<name>.addrepro-<random>.tmp``: a name no other program's
# file has, so that clean-up removes only what addrepro wrote.
TMP_GLOB = ".*.addrepro-*.tmp"


class StorageError(OSError):
    """A file of the run could not be written (disk full, read-only folder, no permission)."""


def _umask() -> int:
    try:  # Linux states it; reading it elsewhere means setting it, which races with other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: a kill never leaves half a file.

    The file gets the permissions of any other new file (``0o666`` less the umask), not the private
    ``0o600`` of temporary files, so collaborators sharing a folder can read it. Any OS error (disk
    full, read-only folder, permissions) is raised as ``StorageError`` naming ``path``; the
    temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.addrepro-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            reason = e.strerror or errno.errorcode.get(e.errno or 0, str(e))
            raise StorageError(e.errno, f"cannot write {path}: {reason}") from None
        raise


def atomic_write_text(path: Path, text: str) -> Path:
    """``atomic_write`` of a UTF-8 text; returns ``path``."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))
    return Path(path)


RUN_SUBFOLDERS = ("", "checkpoints", "csv", "analysis")  # where a run folder's files are written


def remove_stale_temporaries(job_dir: Path) -> list[Path]:
    """Delete the temporary files a killed run left in a run folder (only while holding its lock)."""
    stale = [p for sub in RUN_SUBFOLDERS for p in (Path(job_dir) / sub).glob(TMP_GLOB) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
