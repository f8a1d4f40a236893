"""MNIST and Fashion-MNIST from the four standard IDX files (plain or ``.gz``).

The files are searched for in, in order: the ``data_dir`` argument (``--data-dir``; its
``<name>`` subfolder, then itself), ``$EPBENCH_DATA`` (likewise), the per-user cache
(``$XDG_CACHE_HOME/epbench/<name>``, default ``~/.cache/epbench/<name>``) and, for
Fashion-MNIST, Debian's ``dataset-fashion-mnist`` package (/usr/share/datasets/fashion-mnist).
The first folder holding all four files wins.
"""

from __future__ import annotations

import math
import os

from epbench.datasets import DATA_ENV, Dataset, DatasetError, Inspection, Split, cache_dir

#: role -> base file name (each may also be gzip-compressed, with ``.gz`` appended)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_SHAPE = (28, 28)

#: images looked at by :func:`content_kind`
SIGNATURE_IMAGES = 100
#: share of zero pixels -> kind of image. Measured per block of 100 images: MNIST digits
#: 0.74-0.89 (the embedded mnist-5k, blocks sorted by digit), Fashion-MNIST 0.46-0.55 (all of
#: its training and test images); a margin on each side, noise (≈0) falls in neither.
CONTENT_KINDS = {"digits": (0.65, 0.97), "clothing": (0.35, 0.62)}


def content_kind(images) -> str | None:
    """'digits' (MNIST-like), 'clothing' (Fashion-MNIST-like) or None, from the share of zero
    pixels in ``images`` (at least :data:`SIGNATURE_IMAGES` of them, else None): a digit is a
    thin stroke on a black frame, a garment fills much of it."""
    import numpy as np

    images = np.asarray(images)
    if len(images) < SIGNATURE_IMAGES:
        return None
    zeros = float(np.mean(images == 0))
    return next((kind for kind, (lo, hi) in CONTENT_KINDS.items() if lo <= zeros <= hi), None)


def find_files(directory: str) -> tuple[dict[str, str], list[str]]:
    """(role -> path of each file found in ``directory``, names of those missing); a plain
    file is preferred to its ``.gz``."""
    found, missing = {}, []
    for role, base in FILES.items():
        for candidate in (base, base + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                found[role] = path
                break
        else:
            missing.append(base + "[.gz]")
    return found, missing


class IdxDataset(Dataset):
    """A dataset stored as the four MNIST-style IDX files."""

    #: folders searched after the user's (e.g. a distribution's package)
    system_dirs: tuple[str, ...] = ()
    #: where to get it, for the error message
    homepage: str = ""
    #: what the images show, as told by :func:`content_kind`
    content: str = ""

    def search_path(self, data_dir: str | None = None) -> list[str]:
        """The folders searched, in order."""
        dirs: list[str] = []
        if data_dir:
            data_dir = os.path.expanduser(os.fspath(data_dir))
            if not os.path.isdir(data_dir):
                raise DatasetError(f"{self.name}: data directory {data_dir} does not exist")
            dirs += [os.path.join(data_dir, self.name), data_dir]
        env = os.environ.get(DATA_ENV, "").strip()
        if env:
            env = os.path.expanduser(env)
            dirs += [os.path.join(env, self.name), env]
        dirs.append(cache_dir(self.name))
        dirs += list(self.system_dirs)
        unique: list[str] = []
        for d in dirs:
            if d not in unique:
                unique.append(d)
        return unique

    def files(self, data_dir: str | None = None) -> dict[str, str]:
        """role -> path of the four files, from the first folder that holds them all."""
        looked = []
        for directory in self.search_path(data_dir):
            if not os.path.isdir(directory):
                looked.append(directory)
                continue
            found, missing = find_files(directory)
            if not missing:
                return found
            looked.append(f"{directory} (missing {', '.join(missing)})" if found else f"{directory} (no IDX files)")
        raise DatasetError(
            f"{self.name}: data not found in {', '.join(looked)}; run `epbench data download {self.name}`, "
            f"or put the four IDX files ({', '.join(FILES.values())}, .gz or not) "
            f"in a folder given by --data-dir or ${DATA_ENV}")

    def locate(self, data_dir: str | None = None) -> str:
        return os.path.dirname(self.files(data_dir)["train_images"])

    def inspect(self, location: str) -> Inspection:
        """Cheap checks of the four files (no full decode: ``load`` reads every byte strictly):

        1. headers: ubyte images N×28×28 and ubyte labels N, N equal within each part;
        2. sizes: the stored data is exactly what the header declares (the file size, or for a
           ``.gz`` file the size in its gzip trailer), so a truncated file is caught;
        3. identity: the two label files (70 KB) against the published checksums of MNIST and
           Fashion-MNIST; when they are not the published files, the content signature of
           :func:`content_kind` on the first training images.
        """
        from epbench.datasets import idx

        found, missing = find_files(location)
        if missing:
            raise DatasetError(f"{location}: missing {', '.join(missing)}")
        n = {}
        for part in ("train", "test"):
            counts = []
            for role, magic in ((f"{part}_images", idx.IMAGES_MAGIC), (f"{part}_labels", idx.LABELS_MAGIC)):
                path = found[role]
                got, dims = idx.read_header(path)
                if got != magic:
                    raise DatasetError(f"{path}: magic number 0x{got:08x}, expected 0x{magic:08x}")
                if role.endswith("images") and dims[1:] != IMAGE_SHAPE:
                    raise DatasetError(f"{path}: images are {'x'.join(map(str, dims[1:]))}, expected 28x28")
                declared = 4 + 4 * len(dims) + math.prod(dims)
                stored = idx.stored_length(path)
                gz = path.endswith(".gz")
                if stored != (declared % 2**32 if gz else declared):
                    what = ("truncated or corrupt" if gz else "truncated" if stored < declared else "trailing data")
                    holds = "its gzip trailer records" if gz else "the file holds"
                    raise DatasetError(f"{path}: {what}: header says {'x'.join(map(str, dims))} = {declared} "
                                       f"bytes, {holds} {stored}")
                counts.append(dims[0])
            if counts[0] != counts[1]:
                raise DatasetError(f"{found[f'{part}_images']}: {counts[0]} images but "
                                   f"{found[f'{part}_labels']} has {counts[1]} labels")
            n[part] = counts[0]
        sizes = f"{n['train']:,} train + {n['test']:,} test"
        return Inspection(n["train"], n["test"], *self._identify(found, sizes))

    def _identify(self, found: dict[str, str], sizes: str) -> tuple[str, str]:
        """(status, note): which dataset the files hold (see :meth:`inspect`, step 3)."""
        from epbench.datasets import idx
        from epbench.datasets.download import published_as

        owners = set()
        for role in ("train_labels", "test_labels"):
            published = published_as(found[role])
            owners.add(published[0] if published and published[1] == FILES[role] + ".gz" else None)
        if len(owners) == 1 and None not in owners:
            owner = owners.pop()
            if owner == self.name:
                return "ok", f"{sizes}; headers and sizes sound, label files are the published ones"
            return "other dataset", f"these are {owner}'s published files, not {self.name}'s"
        kind = content_kind(idx.read_leading(found["train_images"], SIGNATURE_IMAGES))
        if kind is not None and kind != self.content:
            return "other dataset", (f"the images look like {kind} (mostly {'black' if kind == 'digits' else 'filled'}"
                                     f" frames), not {self.content}: not {self.name}")
        looks = f"; the images look like {kind}" if kind else ""
        return "unverified", f"{sizes}; headers and sizes sound, not the published label files{looks}"

    def load(self, data_dir: str | None = None) -> Split:
        import numpy as np

        from epbench.datasets import idx

        paths = self.files(data_dir)
        arrays = {}
        for part in ("train", "test"):
            images, labels = idx.read_pair(paths[f"{part}_images"], paths[f"{part}_labels"])
            if images.shape[1:] != IMAGE_SHAPE:
                raise DatasetError(f"{paths[f'{part}_images']}: images are "
                                   f"{'x'.join(map(str, images.shape[1:]))}, expected 28x28")
            if labels.size and labels.max() >= self.n_classes:
                raise DatasetError(f"{paths[f'{part}_labels']}: label {labels.max()} out of range "
                                   f"0..{self.n_classes - 1}")
            x = images.reshape(len(images), IMAGE_SHAPE[0] * IMAGE_SHAPE[1]).astype(np.float32)
            x /= 255.0
            arrays[part] = (x, labels.astype(np.int64))
        return Split(*arrays["train"], *arrays["test"], source=os.path.dirname(paths["train_images"]),
                     name=self.name)


class Mnist(IdxDataset):
    name = "mnist"
    description = "MNIST handwritten digits, 60,000 train + 10,000 test (LeCun et al.)"
    homepage = "http://yann.lecun.com/exdb/mnist/"
    content = "digits"


class FashionMnist(IdxDataset):
    name = "fashion-mnist"
    description = "Fashion-MNIST clothing images, 60,000 train + 10,000 test (Zalando Research)"
    homepage = "https://github.com/zalandoresearch/fashion-mnist"
    content = "clothing"
    #: Debian/Ubuntu package ``dataset-fashion-mnist``
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
