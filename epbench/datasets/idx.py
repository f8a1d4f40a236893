"""A strict reader and a writer of the IDX format (the MNIST file format), plain or gzip.

Layout: a 4-byte magic ``0x00 0x00 <dtype> <ndim>``, ``ndim`` big-endian uint32 dims, then
exactly ``prod(dims)`` items of ``dtype``. Any deviation (bad magic, wrong dtype or number of
dims, truncated or oversized payload, corrupt gzip stream) raises
:class:`~epbench.errors.DatasetError` with one line naming the file and the problem.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from epbench.errors import DatasetError

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims (count, rows, cols)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim (count)
UBYTE = 0x08

#: IDX type byte -> big-endian NumPy dtype
DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items()}


def _is_gz(path: str) -> bool:
    return os.fspath(path).endswith(".gz")


def _read_bytes(path: str) -> bytes:
    try:
        if _is_gz(path):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except EOFError:
        raise DatasetError(f"{path}: truncated gzip stream (the file is incomplete)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt gzip data ({exc})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse_header(path: str, data: bytes) -> tuple[int, int, tuple[int, ...]]:
    """(type code, header length, dims) of the IDX bytes ``data``."""
    if len(data) < 4:
        raise DatasetError(f"{path}: {len(data)} bytes, too short to be an IDX file")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if data[:2] == b"\x1f\x8b":
        raise DatasetError(f"{path}: gzip-compressed data in a file whose name does not end with .gz")
    if zero != 0 or code not in DTYPES:
        raise DatasetError(f"{path}: bad magic number 0x{data[:4].hex()} (not an IDX file)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path}: truncated header ({len(data)} bytes, {ndim} dims need {header_len})")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    return code, header_len, dims


def read_idx(path: str, magic: int | None = None) -> np.ndarray:
    """The array stored in the IDX file ``path`` (native byte order). With ``magic`` (e.g.
    :data:`IMAGES_MAGIC`), the file's type byte and number of dims must match it."""
    path = os.fspath(path)
    data = _read_bytes(path)
    code, header_len, dims = _parse_header(path, data)
    if magic is not None:
        found = (code << 8) | len(dims)
        if found != magic:
            raise DatasetError(f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} "
                               f"({_describe(magic)})")
    dtype = np.dtype(DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "trailing data"
        raise DatasetError(f"{path}: {what}: header says {'x'.join(map(str, dims))} = {expected} bytes "
                           f"of data, found {payload}")
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else array


def _describe(magic: int) -> str:
    return {IMAGES_MAGIC: "ubyte images, 3 dims", LABELS_MAGIC: "ubyte labels, 1 dim"}.get(
        magic, f"type 0x{magic >> 8 & 0xFF:02x}, {magic & 0xFF} dims")


def read_images(path: str) -> np.ndarray:
    """(N, rows, cols) uint8 images from an ``idx3-ubyte`` file."""
    return read_idx(path, IMAGES_MAGIC)


def read_labels(path: str) -> np.ndarray:
    """(N,) uint8 labels from an ``idx1-ubyte`` file."""
    return read_idx(path, LABELS_MAGIC)


def read_pair(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels that belong together: their counts must match."""
    images, labels = read_images(images_path), read_labels(labels_path)
    if len(images) != len(labels):
        raise DatasetError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels


def read_header(path: str) -> tuple[int, tuple[int, ...]]:
    """(magic, dims) from the header alone (cheap; the payload is not checked)."""
    path = os.fspath(path)
    try:
        opener = gzip.open if _is_gz(path) else open
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) == 4:
                head += f.read(4 * head[3])
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read header ({exc})") from None
    code, _, dims = _parse_header(path, head)
    return (code << 8) | len(dims), dims


def write_idx(path: str, array) -> str:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends with ``.gz``),
    atomically; returns ``path``."""
    path = os.fspath(path)
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise DatasetError(f"{path}: IDX cannot store dtype {array.dtype}")
    if array.ndim > 255:
        raise DatasetError(f"{path}: too many dims ({array.ndim})")
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        if _is_gz(path):
            with open(tmp, "wb") as raw, \
                    gzip.GzipFile(os.path.basename(path), "wb", fileobj=raw, mtime=0) as f:
                f.write(header + payload)
        else:
            with open(tmp, "wb") as f:
                f.write(header + payload)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def stored_length(path: str) -> int:
    """Bytes of IDX data in ``path`` without reading it: the file's size, or for a ``.gz`` file
    the uncompressed size recorded in its gzip trailer (ISIZE, the size modulo 2**32)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if not _is_gz(path):
                return os.fstat(f.fileno()).st_size
            f.seek(0, os.SEEK_END)
            if f.tell() < 18:  # a gzip header and trailer alone take 18 bytes
                raise DatasetError(f"{path}: {f.tell()} bytes, too short to be a gzip file")
            f.seek(-4, os.SEEK_END)
            return struct.unpack("<I", f.read(4))[0]
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_leading(path: str, count: int) -> np.ndarray:
    """The first ``count`` items (e.g. images) of an IDX file, reading only the header and
    those bytes; fewer if the file holds fewer."""
    path = os.fspath(path)
    magic, dims = read_header(path)
    if not dims:
        raise DatasetError(f"{path}: a 0-dim IDX file has no items")
    dtype = np.dtype(DTYPES[magic >> 8])
    count = min(count, dims[0])
    item = math.prod(dims[1:]) * dtype.itemsize
    header_len = 4 + 4 * len(dims)
    try:
        with (gzip.open if _is_gz(path) else open)(path, "rb") as f:
            data = f.read(header_len + count * item)[header_len:]
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    if len(data) != count * item:
        raise DatasetError(f"{path}: truncated: {count} items need {count * item} bytes, found {len(data)}")
    array = np.frombuffer(data, dtype=dtype).reshape((count, *dims[1:]))
    return array.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else array
