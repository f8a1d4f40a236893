"""Building the fused kernel into a private, verified cache.

Rules (a truncated cached library once crashed every later run with SIGBUS):

* The cache is ``$EPBENCH_CACHE/native`` (default ``~/.cache/epbench/native``). Folders it
  creates are mode 0700. The ``native`` folder must belong to this user (else it is refused:
  no kernel, the XLA loop runs) and is made 0700 again if group or others may write to it.
* A library is compiled into a temporary folder beside it and renamed into place; then its
  SHA-256 is written beside it (``<library>.sha256``, also renamed into place). A library
  without that file is one whose build did not finish.
* Before a library is loaded its SHA-256 is compared with the recorded one; a missing record or
  a mismatch (a truncated or corrupted file) means it is rebuilt.
* Builds, checks and writes of files beside the library hold an exclusive lock on
  ``.lock`` in the folder, so that concurrent processes neither build twice nor interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from epbench.results import atomic_write_bytes

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("one_hidden.cc")
CXXFLAGS = ["-std=c++17", "-O3", "-march=native", "-ffast-math", "-fPIC", "-w"]
# linked without -ffast-math, which would set flush-to-zero for the whole process on load
LDFLAGS = ["-shared"]
LIBS = ["-lm"]


class CacheError(OSError):
    """The cache folder cannot be used safely."""


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_fingerprint() -> str:
    """-march=native code is for this CPU only: the library key includes its model and all its
    flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("EPBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "epbench")
    return Path(root) / "native"


def private_dir(path: Path) -> Path:
    """``path``, created with mode 0700 where missing (and its missing parents), checked to
    belong to this user, and made 0700 if group or others have any access to it."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"kernel cache {path} is not a folder")
    if st.st_uid != os.geteuid():
        raise CacheError(f"kernel cache {path} belongs to another user (uid {st.st_uid}); not using it")
    if st.st_mode & 0o077:
        log.info("jax-cpu: kernel cache %s was open to other users (mode %o); made 0700",
                 path, stat.S_IMODE(st.st_mode))
        os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def locked(folder: Path):
    """Exclusive lock on ``folder/.lock`` for the duration of the block."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checksum_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def verified(lib: Path) -> bool:
    """Whether ``lib`` exists and matches the SHA-256 recorded beside it at build time."""
    try:
        recorded = checksum_path(lib).read_text().split()[0]
        return sha256_of(lib) == recorded
    except (OSError, IndexError):
        return False


def library_path(cxx: str) -> Path:
    """Where the library for this source, these flags, this compiler, jaxlib and CPU lives."""
    import jaxlib

    key = hashlib.sha256("\n".join([source_hash(), " ".join(CXXFLAGS + LDFLAGS + LIBS), cxx, jaxlib.__version__,
                                    platform.machine(), cpu_fingerprint()]).encode())
    return cache_dir() / f"one_hidden-{key.hexdigest()[:16]}.so"


def _compile(cxx: str, include: str, out: Path) -> None:
    """Compile into a temporary folder beside ``out``, rename into place, then record the
    checksum (so a recorded checksum always belongs to a complete library)."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "one_hidden.o", Path(tmp) / "one_hidden.so"
        for cmd in ([cxx, *CXXFLAGS, f"-I{include}", "-c", str(SOURCE), "-o", str(obj)],
                    [cxx, *LDFLAGS, str(obj), "-o", str(lib), *LIBS]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:2])} ... failed: {done.stderr.strip()[-500:]}")
        digest = sha256_of(lib)
        os.replace(lib, out)
    atomic_write_bytes(checksum_path(out), f"{digest}  {out.name}\n".encode())


def library(cxx: str, include: str) -> Path:
    """The verified library, compiled first if it is missing, unfinished or corrupt."""
    out = library_path(cxx)
    private_dir(out.parent)
    with locked(out.parent):
        if verified(out):
            return out
        if out.exists():
            log.warning("jax-cpu: cached kernel %s does not match its recorded checksum (truncated, "
                        "corrupt or unfinished); rebuilding it", out)
        _compile(cxx, include, out)
        if not verified(out):
            raise RuntimeError(f"the kernel just built at {out} does not match its checksum")
    return out
