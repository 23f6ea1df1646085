"""Publishing files and folders atomically: write to a temporary sibling, then rename into place.

A crash mid-write leaves only a `.NAME.tmp-*` sibling behind, never a half-written artifact under the
final name; readers see either the old complete version or the new complete one (the next writer
removes such leftovers: `RunDir.remove_stale_temporaries`).

A full disk during a save (OSError ENOSPC/EDQUOT, safetensors' "os error 28", or torch's
`unexpected pos` short-write error, which carries no errno) becomes one `DiskFull` line naming the
path, about how many bytes the save needed and how many are free; the temporary folder is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from aepo_core.errors import EnvironmentFault


class DiskFull(EnvironmentFault):
    """A save ran out of disk space (one line: path, bytes needed, bytes free)."""

    errno = errno.ENOSPC


_FULL_TEXT = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded", "os error 122")
# torch's zip writer reports a short write like this, without an errno
_SHORT_WRITE_TEXT = ("unexpected pos", "file write failed", "pytorchstreamwriter failed")
_LOW_FREE = 64 << 20  # a short write with less than this free is taken for a full disk


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def human_bytes(n: int) -> str:
    """A byte count for people: "512 B", "13.2 MiB"."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def bytes_under(path: Path) -> int:
    """Bytes in the file `path`, or in every file under the folder `path` (unreadable ones skipped)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


def disk_full_error(exc: BaseException, final: Path, partial: Path | None, needed: int | None = None) -> DiskFull | None:
    """A DiskFull for `exc` when it is an out-of-space failure writing `final`, else None. `partial`
    is what was written so far (its size is the lower bound on what was needed); `needed` an
    estimate of the full size, when the caller has one."""
    full = short = False
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            full = True
        text = str(e).lower()
        full = full or any(t in text for t in _FULL_TEXT)
        short = short or (isinstance(e, RuntimeError) and any(t in text for t in _SHORT_WRITE_TEXT))
    if not (full or short):
        return None
    try:
        free = shutil.disk_usage(final.parent if final.parent.exists() else Path(final.anchor or ".")).free
    except OSError:
        free = -1
    if not full and free >= _LOW_FREE:
        return None  # a short write with plenty of space: not a full disk, keep the original error
    written = bytes_under(partial) if partial is not None and partial.exists() else 0
    need = f"about {human_bytes(needed)}" if needed else f"at least {human_bytes(written)} (written before it failed)"
    return DiskFull(
        f"no space left on device writing {final}: needs {need}, {human_bytes(max(free, 0))} free on its file system; "
        "free some space and run the same command again (it resumes here)"
    )


@contextlib.contextmanager
def atomic_dir(final: str | Path, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final`, on error it is removed (an
    out-of-space error becomes DiskFull; `expected_bytes` estimates the size for its message)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        full = disk_full_error(exc, final, None, expected_bytes)
        if full is not None:
            raise full from exc
        raise
    try:
        yield tmp
        if final.exists():
            # Move the old version aside first so `final` is never missing a complete version for long.
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent)) / final.name
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old.parent, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException as exc:
        full = disk_full_error(exc, final, tmp, expected_bytes) if isinstance(exc, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically (temporary file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        full = disk_full_error(exc, path, None, len(text.encode())) if isinstance(exc, Exception) else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full is not None:
            raise full from exc
        raise
