"""Datasets: the IDX reader/writer, the search order, mnist-5k, the downloader (against a
local HTTP server only) and the array helpers. Nothing here touches the network."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import socket
import sys
import threading
import types
from importlib import metadata

import numpy as np
import pytest

from epbench import hookimpl
from epbench.datasets import (
    Dataset,
    DatasetError,
    Split,
    epoch_order,
    load_dataset,
    one_hot,
    shuffled,
)
from epbench.datasets import download as dl
from epbench.datasets import idx
from epbench.datasets.mnist import FILES, FashionMnist, Mnist
from epbench.datasets.mnist5k import CSV_PATH, Mnist5k
from epbench.errors import EpbenchError

DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"
needs_debian = pytest.mark.skipif(
    not os.path.isdir(DEBIAN_FASHION),
    reason=f"{DEBIAN_FASHION} absent (install the Debian package dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Only loopback connections are allowed."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        if address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"network access attempted in tests: {address}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $EPBENCH_DATA, an empty cache, no system folders."""
    monkeypatch.delenv("EPBENCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(FashionMnist, "system_dirs", ())
    return tmp_path


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


def make_idx_set(directory, n_train=3, n_test=2, label=0, gz=True, seed=0):
    """Write the four MNIST files (small, real IDX) into ``directory``; return the arrays."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": np.full(n_train, label, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": np.full(n_test, label, dtype=np.uint8),
    }
    for role, array in arrays.items():
        idx.write_idx(os.path.join(directory, FILES[role] + (".gz" if gz else "")), array)
    return arrays


# --- IDX reader on the real Fashion-MNIST files -------------------------------------------


@needs_debian
def test_idx_reads_real_fashion_mnist():
    for part, n in (("train", 60000), ("t10k", 10000)):
        images, labels = idx.read_pair(os.path.join(DEBIAN_FASHION, f"{part}-images-idx3-ubyte.gz"),
                                       os.path.join(DEBIAN_FASHION, f"{part}-labels-idx1-ubyte.gz"))
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and set(np.unique(labels)) == set(range(10))
        assert images.max() == 255 and images.min() == 0


@needs_debian
def test_fashion_mnist_found_in_debian_folder(isolated, monkeypatch):
    monkeypatch.setattr(FashionMnist, "system_dirs", (DEBIAN_FASHION,))
    ds = FashionMnist()
    assert ds.locate() == DEBIAN_FASHION
    info = ds.info()
    assert info["found"] and info["n_train"] == 60000 and info["n_test"] == 10000
    split = ds.load()
    assert split.source == DEBIAN_FASHION
    assert split.x_train.shape == (60000, 784) and split.x_test.shape == (10000, 784)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert 0.0 <= split.x_test.min() and split.x_test.max() == 1.0
    assert split.y_train[:4].tolist() == [9, 0, 0, 3]  # ankle boot, T-shirt, T-shirt, dress


@needs_debian
def test_published_checksums_match_debian_files():
    # Debian recompressed the .gz files: they pass through the published MD5 of the content
    assert set(dl.verify_dir("fashion-mnist", DEBIAN_FASHION).values()) == {"ok"}


@needs_debian
def test_truncated_copy_of_real_file_is_rejected(tmp_path):
    with open(os.path.join(DEBIAN_FASHION, "t10k-labels-idx1-ubyte.gz"), "rb") as f:
        data = f.read()
    cut_gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    cut_gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as err:
        idx.read_labels(str(cut_gz))
    assert str(cut_gz) in one_line(err) and "truncated" in str(err.value)

    raw = gzip.decompress(data)
    cut = tmp_path / "t10k-labels-idx1-ubyte"
    cut.write_bytes(raw[:5000])
    with pytest.raises(DatasetError) as err:
        idx.read_labels(str(cut))
    assert one_line(err) == f"{cut}: truncated: header says 10000 = 10000 bytes of data, found 4992"


# --- IDX reader/writer on small files --------------------------------------------------------


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype,shape", [(np.uint8, (4, 28, 28)), (np.uint8, (7,)),
                                         (np.int32, (2, 3)), (np.float32, (3, 2, 2)), (np.int16, (5,))])
def test_write_read_roundtrip(tmp_path, name, dtype, shape):
    array = (np.arange(int(np.prod(shape))) % 120).astype(dtype).reshape(shape)
    path = idx.write_idx(str(tmp_path / name), array)
    back = idx.read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert os.listdir(tmp_path) == [name]
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == name.endswith(".gz")


def test_magic_number_errors(tmp_path):
    labels = idx.write_idx(str(tmp_path / "labels"), np.zeros(5, np.uint8))
    with pytest.raises(DatasetError) as err:
        idx.read_images(labels)
    assert one_line(err) == f"{labels}: magic number 0x00000801, expected 0x00000803 (ubyte images, 3 dims)"

    signed = idx.write_idx(str(tmp_path / "signed"), np.zeros((2, 28, 28), np.int8))
    with pytest.raises(DatasetError, match="magic number 0x00000903, expected 0x00000803"):
        idx.read_images(signed)

    junk = tmp_path / "junk"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DatasetError) as err:
        idx.read_labels(str(junk))
    assert one_line(err) == f"{junk}: bad magic number 0x504b0304 (not an IDX file)"

    bad_dtype = tmp_path / "dtype"
    bad_dtype.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DatasetError, match="bad magic number 0x00000701"):
        idx.read_idx(str(bad_dtype))

    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match="too short to be an IDX file"):
        idx.read_idx(str(tiny))

    gz_named_plain = tmp_path / "plain-name"
    gz_named_plain.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x03"))
    with pytest.raises(DatasetError, match="gzip-compressed data in a file whose name does not end with .gz"):
        idx.read_idx(str(gz_named_plain))


def test_length_errors(tmp_path):
    header = b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28))
    short = tmp_path / "short"
    short.write_bytes(header + bytes(2 * 784 - 1))
    with pytest.raises(DatasetError) as err:
        idx.read_images(str(short))
    assert one_line(err) == f"{short}: truncated: header says 2x28x28 = 1568 bytes of data, found 1567"

    long = tmp_path / "long.gz"
    long.write_bytes(gzip.compress(header + bytes(2 * 784 + 3)))
    with pytest.raises(DatasetError, match="trailing data: header says 2x28x28 = 1568 bytes of data, found 1571"):
        idx.read_images(str(long))

    cut_header = tmp_path / "cut-header"
    cut_header.write_bytes(header[:10])
    with pytest.raises(DatasetError, match=r"truncated header \(10 bytes, 3 dims need 16\)"):
        idx.read_images(str(cut_header))


def test_corrupt_gzip_and_missing_file(tmp_path):
    path = idx.write_idx(str(tmp_path / "x.gz"), np.arange(200, dtype=np.uint8))
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[-6] ^= 0xFF  # inside the CRC/size trailer
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(DatasetError) as err:
        idx.read_labels(path)
    assert one_line(err).startswith(f"{path}: corrupt gzip data")

    not_gz = tmp_path / "y.gz"
    not_gz.write_bytes(b"hello world")
    with pytest.raises(DatasetError, match="corrupt gzip data"):
        idx.read_labels(str(not_gz))

    with pytest.raises(DatasetError) as err:
        idx.read_labels(str(tmp_path / "nope"))
    assert one_line(err) == f"{tmp_path / 'nope'}: no such file"


def test_image_and_label_counts_must_match(tmp_path):
    images = idx.write_idx(str(tmp_path / "i.gz"), np.zeros((3, 28, 28), np.uint8))
    labels = idx.write_idx(str(tmp_path / "l.gz"), np.zeros(4, np.uint8))
    with pytest.raises(DatasetError) as err:
        idx.read_pair(images, labels)
    assert one_line(err) == f"{images}: 3 images but {labels} has 4 labels"


def test_read_header_is_cheap_and_strict(tmp_path):
    path = idx.write_idx(str(tmp_path / "i.gz"), np.zeros((3, 28, 28), np.uint8))
    assert idx.read_header(path) == (idx.IMAGES_MAGIC, (3, 28, 28))
    with pytest.raises(DatasetError, match="no such file"):
        idx.read_header(str(tmp_path / "missing.gz"))


# --- mnist / fashion-mnist: search order and loading ----------------------------------------


def test_search_order(isolated, monkeypatch):
    tmp = isolated
    explicit, env, cache = tmp / "explicit", tmp / "env", tmp / "xdg-cache" / "epbench" / "mnist"
    make_idx_set(explicit, label=1)
    make_idx_set(env, label=2, gz=False)
    make_idx_set(cache, label=3)
    monkeypatch.setenv("EPBENCH_DATA", str(env))
    ds = Mnist()

    assert ds.locate(str(explicit)) == str(explicit)
    split = ds.load(str(explicit))
    assert split.source == str(explicit) and set(split.y_train) == {1}
    assert ds.load().source == str(env) and set(ds.load().y_test) == {2}
    # the dataset's own subfolder of $EPBENCH_DATA comes before $EPBENCH_DATA itself
    make_idx_set(env / "mnist", label=4)
    assert ds.locate() == str(env / "mnist")
    monkeypatch.delenv("EPBENCH_DATA")
    assert ds.locate() == str(cache) and set(ds.load().y_train) == {3}
    # a data_dir that holds no copy falls through to the next place
    (tmp / "empty").mkdir()
    assert ds.locate(str(tmp / "empty")) == str(cache)


def test_search_prefers_data_dir_subfolder_and_plain_files(isolated):
    root = isolated / "data"
    make_idx_set(root / "fashion-mnist", label=5)
    make_idx_set(root, label=6)
    assert FashionMnist().locate(str(root)) == str(root / "fashion-mnist")
    make_idx_set(root / "fashion-mnist", label=7, gz=False)  # plain files beat their .gz
    assert set(FashionMnist().load(str(root)).y_train) == {7}


def test_not_found_message(isolated, monkeypatch):
    env = isolated / "env"
    env.mkdir()
    monkeypatch.setenv("EPBENCH_DATA", str(env))
    partial = isolated / "partial"
    make_idx_set(partial)
    os.remove(partial / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError) as err:
        Mnist().locate(str(partial))
    message = one_line(err)
    assert message.startswith("mnist: data not found in ")
    assert f"{partial} (missing t10k-labels-idx1-ubyte[.gz])" in message
    assert f"{env} (no IDX files)" in message
    assert str(isolated / "xdg-cache" / "epbench" / "mnist") in message
    assert "epbench data download mnist" in message
    info = Mnist().info()
    assert info["found"] is False and "epbench data download mnist" in info["reason"]

    with pytest.raises(DatasetError) as err:
        Mnist().locate(str(isolated / "typo"))
    assert one_line(err) == f"mnist: data directory {isolated / 'typo'} does not exist"


def test_load_converts_and_checks(isolated):
    d = isolated / "d"
    arrays = make_idx_set(d, n_train=4, n_test=3, label=9)
    split = Mnist().load(str(d))
    assert split.x_train.shape == (4, 784) and split.x_train.dtype == np.float32
    np.testing.assert_array_equal(split.x_train, arrays["train_images"].reshape(4, 784) / np.float32(255))
    assert split.y_test.dtype == np.int64 and split.y_test.tolist() == [9, 9, 9]
    assert Mnist().info(str(d))["n_train"] == 4

    idx.write_idx(str(d / "train-labels-idx1-ubyte.gz"), np.array([0, 1, 2, 10], np.uint8))
    with pytest.raises(DatasetError, match="label 10 out of range 0..9"):
        Mnist().load(str(d))
    idx.write_idx(str(d / "train-labels-idx1-ubyte.gz"), np.zeros(5, np.uint8))
    with pytest.raises(DatasetError, match="4 images but .* has 5 labels"):
        Mnist().load(str(d))
    idx.write_idx(str(d / "train-labels-idx1-ubyte.gz"), np.zeros(4, np.uint8))
    idx.write_idx(str(d / "train-images-idx3-ubyte.gz"), np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(DatasetError, match="images are 32x32, expected 28x28"):
        Mnist().load(str(d))


# --- `epbench data`: is what was found sound, and which dataset is it? ----------------------


def digits_set(directory, n_train=300, n_test=100, gz=True):
    """MNIST-format files holding real handwritten digits (from the embedded mnist-5k), not the
    published MNIST files: their labels have other checksums."""
    from epbench.datasets.mnist5k import read_csv

    images, labels = read_csv()
    order = np.random.default_rng(0).permutation(len(labels))[: n_train + n_test]
    os.makedirs(directory, exist_ok=True)
    parts = {"train_images": images[order[:n_train]].reshape(-1, 28, 28), "train_labels": labels[order[:n_train]],
             "test_images": images[order[n_train:]].reshape(-1, 28, 28), "test_labels": labels[order[n_train:]]}
    for role, array in parts.items():
        idx.write_idx(os.path.join(directory, FILES[role] + (".gz" if gz else "")), array)
    return directory


@needs_debian
def test_inspection_verifies_real_fashion_mnist_and_refuses_it_as_mnist(isolated, monkeypatch):
    info = FashionMnist().info(DEBIAN_FASHION)
    assert info["status"] == "ok" and (info["n_train"], info["n_test"]) == (60000, 10000)
    assert "published" in info["reason"]
    # a folder of Fashion-MNIST files given as MNIST: found, but not MNIST
    mnist = Mnist().info(DEBIAN_FASHION)
    assert mnist["found"] and mnist["status"] == "other dataset"
    assert "fashion-mnist's published files" in mnist["reason"]


@needs_debian
def test_inspection_of_plain_copies_of_published_labels(isolated):
    """Labels stored uncompressed are recognised by the checksum of their content."""
    d = isolated / "plain"
    d.mkdir()
    for name in os.listdir(DEBIAN_FASHION):
        src = os.path.join(DEBIAN_FASHION, name)
        if "labels" in name:
            (d / name.removesuffix(".gz")).write_bytes(gzip.decompress(open(src, "rb").read()))
        else:
            os.symlink(src, d / name)
    assert dl.published_as(str(d / "t10k-labels-idx1-ubyte")) == ("fashion-mnist", "t10k-labels-idx1-ubyte.gz")
    assert FashionMnist().info(str(d))["status"] == "ok"


@needs_debian
def test_inspection_of_a_fashion_subset_by_content(isolated):
    """Not the published files (a subset): told apart by what the images look like."""
    d = isolated / "subset"
    d.mkdir()
    for role, base in FILES.items():
        array = idx.read_idx(os.path.join(DEBIAN_FASHION, base + ".gz"))
        idx.write_idx(str(d / (base + ".gz")), array[:200])
    fashion, mnist = FashionMnist().info(str(d)), Mnist().info(str(d))
    assert fashion["status"] == "unverified" and "look like clothing" in fashion["reason"]
    assert fashion["n_train"] == 200
    assert mnist["status"] == "other dataset" and "look like clothing" in mnist["reason"]


@pytest.mark.parametrize("gz", [True, False])
def test_inspection_tells_digits_from_clothing(isolated, gz):
    d = digits_set(isolated / "digits", gz=gz)
    mnist, fashion = Mnist().info(str(d)), FashionMnist().info(str(d))
    assert mnist["status"] == "unverified" and "look like digits" in mnist["reason"]
    assert (mnist["n_train"], mnist["n_test"]) == (300, 100)
    assert fashion["found"] and fashion["status"] == "other dataset"
    assert "look like digits" in fashion["reason"] and "not fashion-mnist" in fashion["reason"]
    # noise is neither: no verdict on content
    noise = isolated / "noise"
    make_idx_set(noise, n_train=150, n_test=10)
    assert FashionMnist().info(str(noise))["status"] == "unverified"
    assert "look like" not in FashionMnist().info(str(noise))["reason"]


def _truncate_gz(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 2 // 3])


def _cut_plain(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-784])


CORRUPTIONS = {
    "truncated gz": (True, lambda d: _truncate_gz(d / "train-images-idx3-ubyte.gz"),
                     "train-images-idx3-ubyte.gz: truncated or corrupt: header says 300x28x28"),
    "truncated plain": (False, lambda d: _cut_plain(d / "t10k-images-idx3-ubyte"),
                        "t10k-images-idx3-ubyte: truncated: header says 100x28x28 = 78416 bytes, the file holds 77632"),
    "labels as images": (True, lambda d: idx.write_idx(str(d / "train-images-idx3-ubyte.gz"), np.zeros(300, np.uint8)),
                         "magic number 0x00000801, expected 0x00000803"),
    "count mismatch": (True, lambda d: idx.write_idx(str(d / "t10k-labels-idx1-ubyte.gz"), np.zeros(99, np.uint8)),
                       "100 images but"),
    "not 28x28": (True, lambda d: idx.write_idx(str(d / "train-images-idx3-ubyte.gz"),
                                                np.zeros((300, 27, 28), np.uint8)), "images are 27x28"),
    "not IDX": (True, lambda d: (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"<html>404</html>")),
                "bad magic number"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_inspection_reports_corrupt_files(isolated, case):
    gz, corrupt, expected = CORRUPTIONS[case]
    d = digits_set(isolated / "d", gz=gz)
    corrupt(d)
    info = Mnist().info(str(d))
    assert info["found"] and info["status"] == "bad", info
    assert expected in info["reason"] and "\n" not in info["reason"]


def test_idx_stored_length_and_read_leading(tmp_path):
    images = np.arange(5 * 28 * 28, dtype=np.int64).reshape(5, 28, 28).astype(np.uint8)
    for name in ("i", "i.gz"):
        path = idx.write_idx(str(tmp_path / name), images)
        assert idx.stored_length(path) == 16 + images.size
        np.testing.assert_array_equal(idx.read_leading(path, 2), images[:2])
        np.testing.assert_array_equal(idx.read_leading(path, 50), images)


# --- mnist-5k ---------------------------------------------------------------------------------


def test_mnist5k_embedded_split():
    split = Mnist5k().load()
    assert (split.n_train, split.n_test) == (4000, 1000)
    assert split.x_train.shape == (4000, 784) and split.x_test.shape == (1000, 784)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0
    assert np.bincount(split.y_train).tolist() == [400] * 10
    assert np.bincount(split.y_test).tolist() == [100] * 10
    assert split.y_train[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert "mnist_5k.csv.gz" in split.source

    with gzip.open(CSV_PATH, "rt") as f:
        rows = [next(f) for _ in range(402)]
    row0 = np.array(rows[0].split(","), dtype=np.float32)
    np.testing.assert_array_equal(split.x_train[0], row0[:-1] / 255)
    assert split.y_train[0] == row0[-1] == 0
    row400 = np.array(rows[400].split(","), dtype=np.float32)
    np.testing.assert_array_equal(split.x_test[0], row400[:-1] / 255)

    info = Mnist5k().info("/ignored")
    assert info["found"] and (info["n_train"], info["n_test"]) == (4000, 1000)


def test_mnist5k_train_and_test_are_disjoint_and_copies():
    a, b = Mnist5k().load(), Mnist5k().load()
    a.x_train[0] = 0.5  # a caller's change does not leak into later loads
    np.testing.assert_array_equal(b.x_train[1:], Mnist5k().load().x_train[1:])
    assert Mnist5k().load().x_train[0].max() == 1.0
    train = {row.tobytes() for row in b.x_train}
    assert not any(row.tobytes() in train for row in b.x_test)


# --- registry ---------------------------------------------------------------------------------


class Tiny(Dataset):
    name = "tiny-third-party"
    description = "two images"

    def locate(self, data_dir=None):
        return "memory"

    def load(self, data_dir=None):
        x = np.zeros((2, 784), np.float32)
        return Split(x, np.array([0, 1]), x[:1], np.array([1]), source="memory")


@pytest.fixture
def plugin_registry(monkeypatch):
    """The registry built from the built-in plugin plus a third-party one declared through an
    entry point (the missing optional backends are left out)."""
    from epbench import plugins

    module = types.ModuleType("epbench_test_tiny_plugin")
    module.epbench_datasets = hookimpl(lambda: [Tiny()])
    monkeypatch.setitem(sys.modules, module.__name__, module)
    fake = metadata.EntryPoint("tiny", module.__name__, plugins.GROUP)
    core = [ep for ep in metadata.entry_points(group=plugins.GROUP) if ep.name == "core"]
    monkeypatch.setattr(plugins, "_entry_points", lambda: core + [fake])
    plugins.registry.cache_clear()
    yield plugins.registry()
    plugins.registry.cache_clear()


def test_load_dataset_through_registry(plugin_registry):
    assert {"mnist-5k", "mnist", "fashion-mnist", "tiny-third-party"} <= set(plugin_registry.datasets)
    assert load_dataset("mnist-5k").n_train == 4000
    tiny = load_dataset("tiny-third-party")
    assert tiny.n_train == 2 and tiny.name == "tiny-third-party"
    # a dataset that defines no checks is listed as found but not verified
    info = Tiny().info()
    assert info["found"] and info["status"] == "unverified" and "no checks" in info["reason"]
    with pytest.raises(EpbenchError, match="unknown dataset 'mnist5k'; did you mean 'mnist-5k'"):
        load_dataset("mnist5k")


# --- downloader against a local HTTP server ----------------------------------------------------


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/short/"):  # promises 5000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + bytes(8))
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, served folder) of an HTTP server on 127.0.0.1."""
    root = tmp_path_factory.mktemp("www")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(scope="module")
def mirrors(server):
    """A good mirror ('good/'), a mirror serving wrong files ('bad/'), and the checksums."""
    base, root = server
    arrays = make_idx_set(root / "good", n_train=5, n_test=2, label=4)
    make_idx_set(root / "bad", n_train=5, n_test=2, label=8, seed=1)
    checksums = {f + ".gz": hashlib.md5((root / "good" / (f + ".gz")).read_bytes()).hexdigest()
                 for f in FILES.values()}
    return types.SimpleNamespace(good=f"{base}/good/", bad=f"{base}/bad/", missing=f"{base}/nothing/",
                                 short=f"{base}/short/", checksums=checksums, arrays=arrays)


def test_download_success_then_skip(isolated, mirrors):
    dest = isolated / "dl"
    log = []
    assert dl.download("mnist", str(dest), [mirrors.good], checksums=mirrors.checksums, log=log.append) == str(dest)
    assert sorted(os.listdir(dest)) == sorted(f + ".gz" for f in FILES.values())
    split = Mnist().load(str(dest))
    np.testing.assert_array_equal(split.x_test, mirrors.arrays["test_images"].reshape(2, 784) / np.float32(255))
    assert sum(line.startswith("fetching ") for line in log) == 4

    log.clear()  # already there with good checksums: nothing fetched, no mirror needed
    dl.download("mnist", str(dest), [], checksums=mirrors.checksums, log=log.append)
    assert len(log) == 4 and all(line.endswith("present, checksum ok") for line in log)


def test_download_into_cache_by_default(isolated, mirrors):
    dest = dl.download("fashion-mnist", mirrors=[mirrors.good], checksums=mirrors.checksums)
    assert dest == str(isolated / "xdg-cache" / "epbench" / "fashion-mnist")
    assert FashionMnist().locate() == dest


def test_download_bad_checksum_then_second_mirror(isolated, mirrors):
    dest = isolated / "dl"
    dest.mkdir()
    (dest / "train-labels-idx1-ubyte.gz").write_bytes(b"stale")  # a bad copy gets replaced
    log = []
    dl.download("mnist", str(dest), [mirrors.bad, mirrors.good], checksums=mirrors.checksums, log=log.append)
    assert sum("checksum mismatch" in line for line in log) == 4
    for f in FILES.values():
        assert hashlib.md5((dest / (f + ".gz")).read_bytes()).hexdigest() == mirrors.checksums[f + ".gz"]
    assert sorted(os.listdir(dest)) == sorted(f + ".gz" for f in FILES.values())
    assert set(Mnist().load(str(dest)).y_train) == {4}


def test_download_all_mirrors_fail(isolated, mirrors):
    dest = isolated / "dl"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/"
    with pytest.raises(DatasetError) as err:
        dl.download("mnist", str(dest), [mirrors.bad, mirrors.missing, mirrors.short, refused],
                    checksums=mirrors.checksums, timeout=5)
    message = one_line(err)
    assert message.startswith("mnist: could not download train-images-idx3-ubyte.gz (")
    assert f"{mirrors.bad}train-images-idx3-ubyte.gz: checksum mismatch" in message
    assert f"{mirrors.missing}train-images-idx3-ubyte.gz: HTTP 404" in message
    assert f"{mirrors.short}train-images-idx3-ubyte.gz:" in message
    assert f"{refused}train-images-idx3-ubyte.gz:" in message
    assert os.listdir(dest) == []  # no partial or unverified file left


def test_download_interrupted_transfer_leaves_nothing(isolated, mirrors):
    dest = isolated / "dl"
    with pytest.raises(DatasetError, match="could not download"):
        dl.download("fashion-mnist", str(dest), [mirrors.short], checksums=mirrors.checksums, timeout=5)
    assert os.listdir(dest) == []


def test_download_unknown_names():
    with pytest.raises(DatasetError, match="no download known for dataset 'cifar'"):
        dl.download("cifar")
    with pytest.raises(DatasetError, match="mnist-5k is embedded"):
        dl.download("mnist-5k")


def test_verify_accepts_recompressed_copy(tmp_path):
    content = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03"
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(content, mtime=123))
    res = dl.Resource("labels.gz", md5="0" * 32, raw_md5=hashlib.md5(content).hexdigest())
    assert dl.verify_file(str(path), res)
    assert not dl.verify_file(str(path), dl.Resource("labels.gz", md5="0" * 32, raw_md5="1" * 32))
    path.write_bytes(b"not gzip")
    assert not dl.verify_file(str(path), res)


def test_published_tables_are_complete():
    for name in ("mnist", "fashion-mnist"):
        assert [r.filename for r in dl.RESOURCES[name]] == [f + ".gz" for f in FILES.values()]
        for r in dl.RESOURCES[name]:
            assert len(r.md5) == len(r.raw_md5) == 32 and int(r.md5, 16) >= 0 and int(r.raw_md5, 16) >= 0
        assert len(dl.MIRRORS[name]) >= 2 and all(m.startswith("http") and m.endswith("/") for m in dl.MIRRORS[name])


# --- helpers ------------------------------------------------------------------------------------


def test_one_hot():
    y = one_hot(np.array([3, 0, 9]))
    assert y.shape == (3, 10) and y.dtype == np.float32
    assert y.sum(axis=1).tolist() == [1, 1, 1] and y[0, 3] == y[1, 0] == y[2, 9] == 1
    assert one_hot([1], n_classes=3).tolist() == [[0, 1, 0]]
    with pytest.raises(DatasetError, match="labels must lie in 0..9"):
        one_hot(np.array([10]))


def test_epoch_order_and_shuffled_are_deterministic():
    a, b = epoch_order(100, 7), epoch_order(100, 7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.random.default_rng(7).permutation(100))
    assert sorted(a.tolist()) == list(range(100)) and not np.array_equal(a, epoch_order(100, 8))

    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10)
    xs, ys = shuffled((x, y), seed=3)
    np.testing.assert_array_equal(xs[:, 0] / 2, ys)
    np.testing.assert_array_equal(ys, epoch_order(10, 3))
    np.testing.assert_array_equal(shuffled(y, 3), ys)
    with pytest.raises(DatasetError, match="different lengths"):
        shuffled((x, y[:5]), 0)

    split = Split(x, y, x[:3], y[:3], source="here")
    s = shuffled(split, 3)
    np.testing.assert_array_equal(s.y_train, ys)
    np.testing.assert_array_equal(s.x_test, x[:3])
    assert s.source == "here" and split.y_train.tolist() == list(range(10))


def test_split_checks_lengths():
    with pytest.raises(DatasetError, match="3 train images but 2 train labels"):
        Split(np.zeros((3, 784)), np.zeros(2), np.zeros((1, 784)), np.zeros(1))
