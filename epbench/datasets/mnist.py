"""MNIST and Fashion-MNIST from the four standard IDX files (plain or ``.gz``).

The files are searched for in, in order: the ``data_dir`` argument (``--data-dir``; its
``<name>`` subfolder, then itself), ``$EPBENCH_DATA`` (likewise), the per-user cache
(``$XDG_CACHE_HOME/epbench/<name>``, default ``~/.cache/epbench/<name>``) and, for
Fashion-MNIST, Debian's ``dataset-fashion-mnist`` package (/usr/share/datasets/fashion-mnist).
The first folder holding all four files wins.
"""

from __future__ import annotations

import os

from epbench.datasets import DATA_ENV, Dataset, DatasetError, Split, cache_dir

#: role -> base file name (each may also be gzip-compressed, with ``.gz`` appended)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_SHAPE = (28, 28)


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

    def sizes(self, location: str) -> tuple[int | None, int | None]:
        from epbench.datasets import idx

        found, _ = find_files(location)
        n = {}
        for part in ("train", "test"):
            _, dims = idx.read_header(found[f"{part}_labels"])
            n[part] = dims[0] if dims else None
        return n["train"], n["test"]

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
            x = images.reshape(len(images), -1).astype(np.float32)
            x /= 255.0
            arrays[part] = (x, labels.astype(np.int64))
        return Split(*arrays["train"], *arrays["test"], source=os.path.dirname(paths["train_images"]),
                     name=self.name)


class Mnist(IdxDataset):
    name = "mnist"
    description = "MNIST handwritten digits, 60,000 train + 10,000 test (LeCun et al.)"
    homepage = "http://yann.lecun.com/exdb/mnist/"


class FashionMnist(IdxDataset):
    name = "fashion-mnist"
    description = "Fashion-MNIST clothing images, 60,000 train + 10,000 test (Zalando Research)"
    homepage = "https://github.com/zalandoresearch/fashion-mnist"
    #: Debian/Ubuntu package ``dataset-fashion-mnist``
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
