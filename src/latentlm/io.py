"""Files: atomic writes, JSON, torch/safetensors tensors, and streamed deterministic ``.npz`` files.

Every writer here goes through ``atomic_write``: the bytes go to a temporary name beside the target,
are fsynced and renamed into place, so a crash leaves either the old file or the new one, never half
of one. Readers never unpickle arbitrary objects (``torch.load(weights_only=True)``, safetensors,
``np.load(allow_pickle=False)``).

``.npz`` files (the ADM evaluator's format) are written by ``NpzWriter``: uncompressed members with
fixed timestamps, so equal arrays always give equal bytes, and an array can be streamed in row
chunks so a 10 GB ``arr_0`` never has to be in memory. ``npz_keys`` / ``npz_array_info`` read headers
only, ``iter_npz_rows`` streams rows back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps, so equal arrays give byte-equal files


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def check_writable(folder: str | os.PathLike, option: str) -> None:
    """Create ``folder`` if needed and make sure a file can be made in it, before any work is done: else
    ``ConfigError`` naming ``option`` (the flag that chose it)."""
    from latentlm.config import ConfigError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"{option}: cannot write to {folder} ({err.strerror or err}); choose a writable "
                          "location") from err


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """Where ``atomic_write`` stages ``path`` (one name per process, so writers never share one)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a staging file of ``atomic_write`` (``.<name>.tmp-<pid>``)."""
    return path.name.startswith(".") and ".tmp-" in path.name


def current_umask() -> int:
    """The process's umask (read without changing it where ``/proc`` tells it; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the staging files a killed writer left in ``folder`` (call only while nobody writes there)."""
    for stale in folder.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    The file gets the permissions of a plain ``open`` (0666 less the umask), whatever ``write`` used
    (safetensors creates its files 0600, which colleagues on a shared filesystem could not read).
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, allow_nan=True)))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_torch(path: str | os.PathLike, obj: Any) -> None:
    """torch.save of tensors and plain containers (what ``torch.load(weights_only=True)`` reads)."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_torch(path: str | os.PathLike) -> Any:
    """Load a file written by ``write_torch``; never unpickles arbitrary objects."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def write_safetensors(path: str | os.PathLike, state: dict[str, Any], metadata: dict[str, str] | None = None
                      ) -> None:
    """Tensors (moved to CPU, made contiguous) as a safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"}))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# .npz files: streamed, deterministic writing; header-only and streamed reading
# ---------------------------------------------------------------------------------------------


class NpzWriter:
    """Write a ``.npz`` (an uncompressed zip of ``.npy`` members) one member at a time.

    ``write_stream`` takes an array's rows in chunks, so a 10 GB ``arr_0`` never has to be in memory.
    Members carry a fixed timestamp (numpy's ``savez`` stamps the current time), so the same arrays
    always give the same bytes. ``np.load`` and the ADM evaluator read the result as usual.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write(self, name: str, array: np.ndarray) -> None:
        """Add ``array`` as member ``<name>.npy``."""
        array = np.asarray(array)
        self.write_stream(name, array.shape, array.dtype, [array])

    def write_stream(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type,
                     chunks: Iterable[np.ndarray]) -> None:
        """Add member ``<name>.npy`` of ``shape``/``dtype`` from ``chunks`` (C-order pieces, concatenated).

        Raises ``ValueError`` when the chunks do not hold exactly ``prod(shape)`` values.
        """
        dtype = np.dtype(dtype)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16  # -rw-r--r-- for unzip, independent of the umask
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": tuple(int(s) for s in shape)}
        expected = math.prod(header["shape"]) * dtype.itemsize
        written = 0
        with self._zip.open(info, "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                member.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
        if written != expected:
            raise ValueError(f"{name}: chunks hold {written} bytes, shape {header['shape']} needs {expected}")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_npy_header(member: Any) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Array names in a ``.npz`` (member names without ``.npy``), without reading any data."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a .npz file (not a zip archive: {err})") from err


def npz_array_info(path: str | os.PathLike, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of array ``key`` of a ``.npz``, read from its header only."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as member:
        shape, fortran_order, dtype = _read_npy_header(member)
    if fortran_order:
        raise ValueError(f"{path}: {key} is stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
    return tuple(shape), dtype


def iter_npz_rows(path: str | os.PathLike, key: str, batch_size: int, limit: int | None = None
                  ) -> Iterator[np.ndarray]:
    """Consecutive batches ``(<= batch_size, *shape[1:])`` of the rows of array ``key``, streamed.

    Works for compressed and uncompressed members alike; memory holds one batch. ``limit`` stops
    after that many rows.
    """
    shape, dtype = npz_array_info(path, key)
    rows = shape[0] if limit is None else min(limit, shape[0])
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as member:
        _read_npy_header(member)
        for start in range(0, rows, batch_size):
            count = min(batch_size, rows - start)
            data = member.read(count * row_bytes)
            if len(data) != count * row_bytes:
                raise ValueError(f"{path}: {key} ends after {start} rows, its header says {shape[0]}")
            yield np.frombuffer(bytearray(data), dtype=dtype).reshape(count, *shape[1:])  # writable
