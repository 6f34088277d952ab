"""File safety shared by every writer and reader of the package.

* :func:`atomic_write`: the package's one atomic writer. It writes a temporary file beside
  the target (named ``.<name>.rvclora-tmp-<pid>-<random>``, so a write killed half-way leaves
  a file that says what it is and whose it was), fsyncs it, gives it the mode a new file
  would get under the umask (or the mode of the file it replaces), and moves it into place.
  Stale temporaries of dead writers for the same target are removed on the next write.
* :func:`check_output_path`: everything that can be known about an output path before any
  work is done (empty, a directory, a device, a missing or read-only directory, an input
  file, an existing file without ``overwrite``).
* :func:`detect_format`: what a file holds, from its first bytes (safetensors header, torch's
  zip archive, a bare pickle), so errors can name it and readers don't trust the suffix.
* :func:`torch_load_error`: one line saying why ``torch.load(weights_only=True)`` refused a
  file, naming the global a pickle tried to import, and giving no advice to turn safety off.
* :func:`first_nonfinite`: the first tensor that is not finite in a given dtype, and why.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable, Iterable
from typing import Union

import torch
from torch import Tensor

__all__ = [
    "RVCLoRAWarning",
    "format_bytes",
    "atomic_write",
    "check_output_path",
    "check_torch_archive",
    "detect_format",
    "describe_format",
    "first_nonfinite",
    "torch_load_error",
    "TMP_MARK",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The marker in the names of the temporary files :func:`atomic_write` creates.
TMP_MARK = ".rvclora-tmp-"


class RVCLoRAWarning(UserWarning):
    """A warning of rvclora itself (the CLI prints these; library warnings it keeps quiet)."""


# --------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OSError:
        return False
    return True


def stale_temporaries(path: PathLike) -> list:
    """Temporary files left beside ``path`` by :func:`atomic_write` calls whose process is gone."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    stale = []
    for tmp in glob.glob(os.path.join(glob.escape(directory), "." + glob.escape(name) + TMP_MARK + "*")):
        m = re.fullmatch(re.escape("." + name + TMP_MARK) + r"(\d+)-[0-9a-f]+", os.path.basename(tmp))
        if m and not _pid_alive(int(m.group(1))):
            stale.append(tmp)
    return stale


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_OS_ERROR = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


def _write_failure(e: BaseException, directory: str) -> str:
    """Why a writer failed, in words: the errno its message carries, else what the file system says now."""
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    m = _OS_ERROR.search(str(e))
    if m:
        return os.strerror(int(m.group(1) or m.group(2)))
    import shutil

    try:
        if shutil.disk_usage(directory).free < 1 << 20:
            return os.strerror(28)  # the free space is gone: ENOSPC
    except OSError:
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            return f"{os.strerror(27)} (the file size limit, ulimit -f, is {soft} bytes)"
    except (ImportError, OSError, ValueError):
        pass
    first = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {first} (a full disk or a file size limit?)"


def atomic_write(
    path: PathLike, write: Callable[[str], None], *, overwrite: bool = True, verify: Callable[[str], None] | None = None
) -> None:
    """Call ``write(tmp_path)``, fsync, then move ``tmp_path`` to ``path`` atomically.

    The new file gets the mode ``0o666 & ~umask`` (as ``open()`` would give it), or the mode of
    the regular file it replaces. ``verify(tmp_path)``, if given, checks the written file before
    it is moved into place. Without ``overwrite`` the move is a hard link, which fails if
    ``path`` appeared meanwhile. On any error the temporary file is removed and ``path`` is
    untouched; a writer's failure (a full disk, a file size limit, in whatever type the writing
    library raises it) becomes one ``OSError`` line naming ``path`` and the cause. The temporary
    file is created with ``O_EXCL | O_NOFOLLOW``: a file or link planted at its name is never
    followed or overwritten.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    for old in stale_temporaries(path):
        try:
            os.unlink(old)
        except OSError:
            pass
    tmp = os.path.join(directory, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
    os.close(fd)
    try:
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except Exception as e:  # noqa: BLE001 -- writers (safetensors, torch) report I/O failures in their own types
            why = _write_failure(e, directory)
            raise OSError(f"writing {path!r} failed: {why}; nothing was replaced") from None
        if verify is not None:
            verify(tmp)
        mode = 0o666 & ~_umask()
        try:
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode):
                mode = stat.S_IMODE(st.st_mode)
        except OSError:
            pass
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"output {path!r} already exists; pass overwrite=True to replace it") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def check_output_path(
    path: PathLike,
    *,
    what: str = "output",
    overwrite: bool = False,
    inputs: Iterable[tuple[str, PathLike]] = (),
    suffixes: tuple[str, ...] | None = None,
) -> str:
    """Validate an output path before any work is done; returns it as a ``str``.

    Raises ``ValueError``/``FileExistsError``/``FileNotFoundError``/``PermissionError`` with one line
    naming ``path``: empty, a directory, not a regular file (``/dev/null``), in a missing or
    read-only directory, one of ``inputs`` (``(name, path)`` pairs), an existing file without
    ``overwrite``, or (with ``suffixes``) a name that does not end in one of them.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not path or not path.strip():
        raise ValueError(f"{what} path is empty; expected a file name")
    if path.endswith(os.sep) or os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a directory; expected a file name")
    if suffixes is not None and not path.lower().endswith(suffixes):
        raise ValueError(f"{what} {path!r} must end in {' or '.join(suffixes)}")
    for name, other in inputs:
        other = os.fspath(other)
        if os.path.exists(path) and os.path.exists(other):
            same = os.path.samefile(path, other)
        else:
            same = os.path.realpath(path) == os.path.realpath(other)
        if same:
            raise ValueError(f"{what} {path!r} is the {name} file; write to a new path")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise ValueError(f"{what} {path!r} exists and is not a regular file; expected a file name")
        if not overwrite:
            raise FileExistsError(f"{what} {path!r} already exists; pass overwrite=True (--overwrite) to replace it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{what} {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path!r}: directory {directory!r} is not writable")
    return path


# --------------------------------------------------------------------------- reading

_FORMAT_NAMES = {
    "safetensors": "a safetensors file",
    "torch-zip": "a torch.save file (zip archive)",
    "zip": "a zip archive that is not a torch.save file",
    "zip-huge": "a zip archive of more members than any torch.save file of rvclora or RVC (not listed)",
    "pickle": "a legacy torch.save / pickle file",
    "empty": "an empty file",
    "text": "a text file",
    "unknown": "an unrecognised binary file",
}


def detect_format(path: PathLike) -> str:
    """What the file at ``path`` holds, judged by its content, never its name.

    One of ``"safetensors"`` (an 8-byte header length then a JSON header), ``"torch-zip"`` (a zip
    archive with torch's ``data.pkl``), ``"zip"``, ``"zip-huge"`` (more than :data:`MAX_ZIP_MEMBERS`
    members, not listed), ``"pickle"`` (protocol 2+ magic, as legacy
    ``torch.save`` writes), ``"empty"``, ``"text"`` or ``"unknown"``.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4096)
        if not head:
            return "empty"
        if len(head) >= 9:
            (n,) = struct.unpack("<Q", head[:8])
            if 2 <= n <= size - 8 and head[8:9] == b"{":
                f.seek(8)
                try:
                    json.loads(f.read(min(n, 100_000_000)).decode("utf-8"))
                    return "safetensors"
                except RecursionError:  # safetensors framing, a JSON header nested too deep: its reader says so
                    return "safetensors"
                except (ValueError, UnicodeDecodeError):
                    pass
    if head[:4] == b"PK\x03\x04":
        import zipfile

        if _zip_entries(path) > MAX_ZIP_MEMBERS:
            return "zip-huge"  # not listed: listing that many members is itself the attack
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("data.pkl") for n in z.namelist()):
                    return "torch-zip"
        except (zipfile.BadZipFile, OSError, ValueError):
            pass
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    for cut in (0, 1, 2, 3):  # a 4096-byte read can split a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return "text" if text and all(c.isprintable() or c in "\t\n\r\f\v" for c in text) else "unknown"
    return "unknown"


#: At most this many members in a torch.save archive (a tensor each; an RVC training checkpoint has ~2000).
MAX_ZIP_MEMBERS = 200_000
#: How much a torch.save archive may declare uncompressed beyond its own size. torch.save stores
#: tensors uncompressed, so a larger declaration means a deflated (bomb-like) archive.
ZIP_SLACK_BYTES = 16 << 20


def _zip_entries(path: str) -> int:
    """The member count of a zip archive from its end record alone (no listing); 0 when unreadable."""
    import zipfile

    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # the stdlib's own end-record reader, zip64 included
    except (OSError, AttributeError, ValueError, struct.error):
        return 0
    return int(end[4]) if end else 0


def check_torch_archive(path: PathLike) -> None:
    """Refuse a torch.save zip archive whose declared sizes are not those of a torch.save file, before loading it.

    ``torch.load`` allocates every storage at the size its archive member declares, so a small
    file holding deflated members (a zip bomb: 1 MB declaring 1 GiB) would make it allocate
    gigabytes. Raises ``ValueError`` (without the path: callers prefix it) when the archive has
    more than :data:`MAX_ZIP_MEMBERS` members or declares more than its size plus
    :data:`ZIP_SLACK_BYTES` uncompressed.
    """
    import zipfile

    path = os.fspath(path)
    size = os.path.getsize(path)
    n = _zip_entries(path)
    if n > MAX_ZIP_MEMBERS:
        raise ValueError(
            f"its zip archive has {n} members; a torch.save file of rvclora or RVC has at most "
            f"{MAX_ZIP_MEMBERS} (MAX_ZIP_MEMBERS)"
        )
    try:
        with zipfile.ZipFile(path) as z:
            declared = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"its zip archive is damaged ({e})") from None
    if declared > size + ZIP_SLACK_BYTES:
        raise ValueError(
            f"its zip members declare {format_bytes(declared)} uncompressed in a {format_bytes(size)} "
            "file; torch.save never compresses, so this archive was deflated by something else (a zip "
            "bomb?) and is not inflated"
        )


def describe_format(fmt: str) -> str:
    """A phrase for a :func:`detect_format` result ("a safetensors file")."""
    return _FORMAT_NAMES.get(fmt, fmt)


_GLOBAL = re.compile(r"Unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)|GLOBAL ([\w.]+)")


def torch_load_error(e: BaseException) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused a file.

    A blocked pickle global is reported as code the safe loader refused to run, naming the
    global. torch's own text (which goes on to suggest disabling ``weights_only``) is dropped.
    """
    text = str(e)
    m = _GLOBAL.search(text)
    if m:
        name = next(g for g in m.groups() if g)
        return f"it contains pickled code ({name}) that the safe loader refused to run; a weights file needs none"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            detail = ln.split("WeightsUnpickler error:", 1)[1].strip()
            if not detail and i + 1 < len(lines) and not lines[i + 1].startswith("Check the documentation"):
                detail = lines[i + 1]
            detail = detail.split(". Please")[0].split("Re-running")[0].strip().rstrip(".")
            if detail.startswith("Unsupported operand"):
                return f"the safe loader cannot read this pickle ({detail}: written with a newer pickle protocol?)"
            return detail or "not a pickle file"
    if isinstance(e, (EOFError, KeyError)) or not lines:
        return f"{type(e).__name__}: truncated, empty or not a torch file"
    first = lines[0].split("Re-running")[0].strip()
    return f"{type(e).__name__}: {first[:200]}"


# --------------------------------------------------------------------------- finiteness


def first_nonfinite(items: Iterable[tuple[str, Tensor]], dtype: torch.dtype | None = None) -> tuple[str, str] | None:
    """The first ``(key, why)`` whose tensor is not finite, cast to ``dtype`` if given (else as is).

    ``why`` counts the NaN and Inf elements, and says when the tensor is finite as it is but
    overflows ``dtype`` (with the largest magnitude against the dtype's maximum).
    """
    for key, t in items:
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        target = t if dtype is None or not t.is_floating_point() else t.to(dtype)
        if bool(torch.isfinite(target).all()):
            continue
        if target is not t and bool(torch.isfinite(t).all()):
            peak = t.detach().abs().max().item()
            return key, (
                f"overflows {str(dtype).replace('torch.', '')} (largest |value| {peak:.4g} > "
                f"{torch.finfo(dtype).max:.6g})"
            )
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        parts = ([f"{n_nan} NaN"] if n_nan else []) + ([f"{n_inf} Inf"] if n_inf else [])
        return key, " and ".join(parts) + f" of {t.numel()} values"
    return None


def format_bytes(n: int) -> str:
    """A file size for people: ``512 B``, ``2.4 KiB``, ``27.7 MiB``."""
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"
