"""Download MNIST / Fashion-MNIST into the per-user cache (``epbench data download NAME``).

Each file is fetched from the mirrors in turn and checked against the published MD5 of the
``.gz`` file (the values torchvision pins) or, for a mirror or distribution that recompressed
it, the published MD5 of its decompressed content. A file is written to a temporary name in
the destination and moved into place with ``os.replace`` only once verified, so no partial or
unverified file is ever left behind; files already present with a good checksum are skipped.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from typing import Callable, Iterable, Mapping

from epbench.datasets import DatasetError, cache_dir


@dataclasses.dataclass(frozen=True)
class Resource:
    filename: str
    md5: str  #: of the .gz file as published
    raw_md5: str = ""  #: of its decompressed content


MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ],
}

RESOURCES: dict[str, list[Resource]] = {
    "mnist": [
        Resource("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        Resource("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        Resource("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        Resource("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    ],
    "fashion-mnist": [
        Resource("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        Resource("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        Resource("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        Resource("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    ],
}

_CHUNK = 1 << 20
USER_AGENT = "epbench-data-download/1"


def file_md5(path: str, decompress: bool = False) -> str:
    """MD5 of the file (of its gzip-decompressed content with ``decompress``)."""
    h = hashlib.md5(usedforsecurity=False)
    with (gzip.open(path, "rb") if decompress else open(path, "rb")) as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def verify_file(path: str, resource: Resource) -> bool:
    """Whether ``path`` holds ``resource``: its MD5 is the published ``.gz`` file's, or the
    MD5 of its content (decompressed if it is gzip data: a recompressed copy; as is if it is
    plain) is that of the published file's content."""
    try:
        digest = file_md5(path)
        if digest == resource.md5 or (resource.raw_md5 and digest == resource.raw_md5):
            return True
        return bool(resource.raw_md5) and _is_gzip(path) and file_md5(path, decompress=True) == resource.raw_md5
    except (OSError, EOFError, zlib.error):
        return False


def published_as(path: str) -> tuple[str, str] | None:
    """(dataset, file name) of the published file whose content ``path`` holds (plain or
    gzip, recompressed or not; by :func:`verify_file`), or None. Reads the whole file: meant
    for the small ones (labels)."""
    for name, resources in RESOURCES.items():
        for res in resources:
            if verify_file(path, res):
                return name, res.filename
    return None


def verify_dir(name: str, directory: str) -> dict[str, str]:
    """filename -> 'ok' / 'missing' / 'bad checksum' for the files of ``name`` in ``directory``."""
    out = {}
    for res in _resources(name):
        path = os.path.join(directory, res.filename)
        out[res.filename] = ("missing" if not os.path.isfile(path)
                             else "ok" if verify_file(path, res) else "bad checksum")
    return out


def _resources(name: str, checksums: Mapping[str, str] | None = None) -> list[Resource]:
    if name not in RESOURCES:
        hint = "; mnist-5k is embedded in epbench, nothing to download" if name == "mnist-5k" else ""
        raise DatasetError(f"no download known for dataset '{name}' (downloadable: "
                           f"{', '.join(sorted(RESOURCES))}){hint}")
    resources = RESOURCES[name]
    if checksums is not None:
        resources = [Resource(r.filename, checksums[r.filename]) if r.filename in checksums else r
                     for r in resources]
    return resources


def _fetch(url: str, directory: str, resource: Resource, timeout: float) -> str:
    """Download ``url`` into a temporary file of ``directory`` and verify it; returns the
    temporary path (the caller moves it into place), or raises with the reason."""
    fd, tmp = tempfile.mkstemp(prefix=f".{resource.filename}.", suffix=".part", dir=directory)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
        if not verify_file(tmp, resource):
            raise ValueError(f"checksum mismatch (md5 {file_md5(tmp)}, expected {resource.md5})")
        return tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        text = f"HTTP {exc.code} {exc.reason}"
    elif isinstance(exc, urllib.error.URLError):
        text = f"{exc.reason}"
    else:
        text = f"{exc}" or type(exc).__name__
    return " ".join(text.split())


def download(name: str, dest: str | None = None, mirrors: Iterable[str] | None = None, *,
             checksums: Mapping[str, str] | None = None, timeout: float = 60.0,
             log: Callable[[str], None] | None = None) -> str:
    """Fetch the four files of ``name`` ('mnist' or 'fashion-mnist') into ``dest`` (default:
    the per-user cache) and return ``dest``. ``mirrors`` replaces the built-in base URLs;
    ``checksums`` (filename -> md5 of the .gz) replaces the published ones. Raises
    :class:`DatasetError` when a file cannot be fetched from any mirror."""
    resources = _resources(name, checksums)
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    mirrors = list(MIRRORS[name] if mirrors is None else mirrors)
    dest = os.path.expanduser(os.fspath(dest)) if dest else cache_dir(name)
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"{name}: cannot create {dest} ({exc.strerror or exc})") from None
    say = log or (lambda message: None)
    for res in resources:
        target = os.path.join(dest, res.filename)
        if os.path.isfile(target) and verify_file(target, res):
            say(f"{target}: present, checksum ok")
            continue
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + res.filename
            say(f"fetching {url}")
            try:
                tmp = _fetch(url, dest, res, timeout)
            except Exception as exc:  # noqa: BLE001 - any failure moves on to the next mirror
                failures.append(f"{url}: {_reason(exc)}")
                say(f"  failed: {_reason(exc)}")
                continue
            try:
                os.replace(tmp, target)
            except OSError as exc:
                os.remove(tmp)
                raise DatasetError(f"{name}: cannot write {target} ({exc.strerror or exc})") from None
            say(f"{target}: ok")
            break
        else:
            tried = "; ".join(failures) or "no mirrors given"
            raise DatasetError(f"{name}: could not download {res.filename} ({tried})")
    return dest
