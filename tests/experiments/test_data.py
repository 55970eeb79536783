"""Dataset builders and preparation scripts, on real embedded data or tiny files in each format.

Every fixture is written into tmp_path by the test itself, in the on-disk format the real
dataset has (IDX, CIFAR pickles, JPEG folders, TinyStories JSON shards), and is read back
through the real torchvision / SentencePiece code paths.
"""

import gzip
import importlib
import json
import os
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from torch.utils.data import DataLoader

from experiments.data import (
    DataSplits,
    TokenWindows,
    cifar10,
    digits,
    fashion_mnist,
    imagenet,
    mnist,
    text_corpus,
    tinystories,
)
from experiments.data.images import CIFAR10_MEAN, CIFAR10_STD, FASHION_MNIST_FILES

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def load_script(name: str):
    """Import scripts/<name>.py as a module, to call its functions directly.

    Through sys.path rather than from the file, so that worker processes can unpickle its functions.
    """
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


def check_classification(splits: DataSplits, num_classes: int, shape: tuple):
    assert splits.model_kwargs == {"num_classes": num_classes, "in_channels": shape[0], "image_size": shape[-1]}
    for dataset in (splits.train, splits.test):
        x, y = dataset[0]
        assert x.shape == shape and x.dtype == torch.float32
        assert 0 <= int(y) < num_classes


# ---------------------------------------------------------------------------- embedded data


def test_digits_split_is_deterministic_and_standardised():
    splits = digits(batch_size=32, seed=3)
    check_classification(splits, 10, (1, 8, 8))
    assert splits.batch_size == 32
    assert (len(splits.train), len(splits.test)) == (1438, 359)  # 1,797 images, 20% held out
    x, y = splits.train.tensors
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert torch.equal(digits(seed=3).test.tensors[1], splits.test.tensors[1])
    assert not torch.equal(digits(seed=4).test.tensors[1], splits.test.tensors[1])


def test_mnist_subset_is_shuffled_before_the_split():
    splits = mnist()
    check_classification(splits, 10, (1, 28, 28))
    assert (len(splits.train), len(splits.test)) == (4000, 1000)
    train_labels, test_labels = splits.train.tensors[1], splits.test.tensors[1]
    # the source rows are sorted by label: an unshuffled split would hold out only 8s and 9s
    assert set(test_labels.tolist()) == set(range(10))
    assert torch.bincount(train_labels).min() > 350


# ---------------------------------------------------------------------------- Fashion-MNIST


def write_idx_gz(src: Path, prefix: str, images: np.ndarray, labels: np.ndarray):
    """Write IDX files as Zalando ships them: big-endian magic and sizes, then raw uint8, gzipped."""
    with gzip.open(src / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, *images.shape) + images.tobytes())
    with gzip.open(src / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "debian"
    src.mkdir()
    train_images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    write_idx_gz(src, "train", train_images, np.arange(12, dtype=np.uint8) % 10)
    write_idx_gz(src, "t10k", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5, dtype=np.uint8))
    root = tmp_path / "fashion_mnist"
    raw = load_script("prepare_fashion_mnist").prepare(str(src), str(root))
    assert sorted(os.listdir(raw)) == sorted(FASHION_MNIST_FILES)

    splits = fashion_mnist(root=str(root), batch_size=10)
    check_classification(splits, 10, (1, 28, 28))
    assert (len(splits.train), len(splits.test), splits.batch_size) == (12, 5, 10)
    x, y = splits.train[3]
    assert int(y) == 3
    expected = (torch.from_numpy(train_images[3]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[0], expected, atol=1e-5)
    assert fashion_mnist(root=str(root), augment=True).train[3][0].shape == (1, 28, 28)


def test_prepare_fashion_mnist_names_the_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_script("prepare_fashion_mnist").prepare(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    load_script("prepare_fashion_mnist").main(["--src", DEBIAN_FASHION_MNIST, "--out", str(tmp_path)])
    splits = fashion_mnist(root=str(tmp_path))
    check_classification(splits, 10, (1, 28, 28))
    assert (len(splits.train), len(splits.test)) == (60000, 10000)


# ---------------------------------------------------------------------------- CIFAR-10


def write_cifar10(root: Path, rng: np.random.Generator, per_batch: int = 4) -> dict:
    """The python-version layout: five training pickles, a test pickle and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": name,
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),  # R, G, B planes of 32x32
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches[name] = batch
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, f, protocol=2)
    return batches


def test_cifar10_reads_the_pickle_batches(tmp_path, monkeypatch):
    batches = write_cifar10(tmp_path, np.random.default_rng(0))
    # the fake files cannot match torchvision's MD5s: check existence only, keep every other step
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: os.path.isfile(path))
    splits = cifar10(root=str(tmp_path), batch_size=100)
    check_classification(splits, 10, (3, 32, 32))
    assert (len(splits.train), len(splits.test)) == (20, 4)
    x, y = splits.test[2]
    test_batch = batches["test_batch"]
    assert int(y) == test_batch["labels"][2]
    pixels = torch.from_numpy(test_batch["data"][2].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(x, (pixels - mean) / std, atol=1e-5)
    augmented = cifar10(root=str(tmp_path), augment=True).train
    crops = {augmented[0][0].sum().item() for _ in range(20)}
    assert augmented[0][0].shape == (3, 32, 32) and len(crops) > 1  # random crops and flips


def test_cifar10_keeps_torchvision_integrity_check(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="corrupted"):
        cifar10(root=str(tmp_path))


# ---------------------------------------------------------------------------- ImageNet


def test_imagenet_image_folders(tmp_path):
    rng = np.random.default_rng(0)
    wnids = ["n01440764", "n01443537", "n01484850"]
    for split, per_class in (("train", 2), ("val", 1)):
        for wnid in wnids:
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG")
    splits = imagenet(root=str(tmp_path), batch_size=8)
    check_classification(splits, 3, (3, 224, 224))
    assert (len(splits.train), len(splits.test), splits.batch_size) == (6, 3, 8)
    assert [splits.test[i][1] for i in range(3)] == [0, 1, 2]


# ---------------------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    "build, looked_at, command",
    [
        (
            fashion_mnist,
            "FashionMNIST/raw/train-images-idx3-ubyte",
            "python scripts/prepare_fashion_mnist.py --out {root}",
        ),
        (cifar10, "cifar-10-batches-py", "torchvision.datasets.CIFAR10('{root}', download=True)"),
        (imagenet, "train", "torchvision.datasets.ImageNet('{root}', split=s)"),
        (tinystories, "tok512", "python scripts/prepare_tinystories.py --out {root} --vocab-size 512"),
    ],
)
def test_missing_dataset_names_path_and_command(tmp_path, build, looked_at, command):
    root = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as error:
        build(root=root)
    assert os.path.join(root, looked_at) in str(error.value)
    assert command.format(root=root) in str(error.value)


def test_missing_tinystories_with_llama2_vocab_asks_for_the_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        tinystories(root=str(tmp_path), vocab_size=32000)


def test_missing_text_file_names_path_and_command(tmp_path):
    path = str(tmp_path / "corpus.txt")
    with pytest.raises(FileNotFoundError) as error:
        text_corpus(path)
    assert f"{path} not found" in str(error.value)
    assert f"python scripts/prepare_text.py --out {path}" in str(error.value)


# ---------------------------------------------------------------------------- TinyStories

VOCABULARY = """
once upon a time there was little girl named lily she loved to play outside with her dog max
one day they found big red ball in the park and ran after it happy sun tree bird sang mom said
we can share toys friend tom was sad because his boat broke so lily helped him fix it together
then everyone smiled ate cake went home slept dreamed about stars moon sky blue green yellow
"""
WORDS = VOCABULARY.split()


def make_stories(rng: np.random.Generator, count: int) -> list[str]:
    """Short 'stories' of random sentences over a small vocabulary; digits exercise split_digits."""
    stories = []
    for _ in range(count):
        sentences = [
            " ".join(rng.choice(WORDS, size=rng.integers(4, 10))).capitalize() + "." for _ in range(rng.integers(2, 5))
        ]
        stories.append(f"  {' '.join(sentences)} She was {rng.integers(2, 9)}.\n")  # padded: shards are .strip()ped
    return stories


def write_shards(folder: Path, num_shards: int = 3, stories_per_shard: int = 150) -> list[list[str]]:
    """TinyStories' JSON shards: each a list of dicts whose "story" field holds the text."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    shards = []
    for i in range(num_shards):
        stories = make_stories(rng, stories_per_shard)
        records = [{"story": s, "instruction": {}, "source": "test"} for s in stories]
        (folder / f"data{i:02d}.json").write_text(json.dumps(records))
        shards.append(stories)
    return shards


def test_tinystories_from_a_local_archive(tmp_path):
    shards = write_shards(tmp_path / "TinyStories_all_data")
    archive = tmp_path / "TinyStories_all_data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(len(shards)):
            tar.add(tmp_path / "TinyStories_all_data" / f"data{i:02d}.json", arcname=f"data{i:02d}.json")
    root = tmp_path / "tinystories"
    bins = load_script("prepare_tinystories").prepare(str(root), archive=str(archive), vocab_size=512, workers=2)
    assert [os.path.basename(b) for b in bins] == ["data00.bin", "data01.bin", "data02.bin"]
    assert not (root / "tiny.txt").exists()

    # shard 0 holds every story of data00.json, each after BOS = 1, and decodes back to the stripped text
    tokenizer = spm.SentencePieceProcessor(model_file=str(root / "tok512.model"))
    assert tokenizer.vocab_size() == 512 and tokenizer.bos_id() == 1
    tokens = np.fromfile(root / "tok512" / "data00.bin", dtype=np.uint16)
    assert tokens[0] == 1 and (tokens == 1).sum() == len(shards[0])
    stories = np.split(tokens, np.flatnonzero(tokens == 1)[1:])
    assert tokenizer.decode(stories[7][1:].tolist()) == shards[0][7].strip()

    splits = tinystories(root=str(root), batch_size=4, max_seq_len=32, vocab_size=512)
    assert splits.batch_size == 4
    assert splits.model_kwargs == {"vocab_size": 512, "max_seq_len": 32}
    assert len(splits.test) == (len(tokens) - 1) // 32
    assert len(splits.train) == sum((os.path.getsize(b) // 2 - 1) // 32 for b in bins[1:])
    x, y = next(iter(DataLoader(splits.train, batch_size=4, shuffle=True)))
    assert x.shape == y.shape == (4, 32)
    for dataset in (splits.train, splits.test):
        x, y = dataset[len(dataset) - 1]
        assert x.shape == y.shape == (32,) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[1:], y[:-1])
        assert 0 <= int(x.min()) and int(x.max()) < 512
    x, y = splits.test[2]
    assert torch.equal(x, torch.from_numpy(tokens[64:96].astype(np.int64)))
    assert torch.equal(y, torch.from_numpy(tokens[65:97].astype(np.int64)))


def test_prepare_tinystories_cli_with_a_given_tokenizer(tmp_path):
    write_shards(tmp_path / "json", num_shards=2)
    script = load_script("prepare_tinystories")
    # a tokenizer.model made elsewhere (llama2.c ships Llama 2's) is copied, and names the shard folder
    stories = tmp_path / "stories.txt"
    stories.write_text("".join(s.strip() + "\n" for s in make_stories(np.random.default_rng(1), 200)))
    given = script.train_tokenizer(str(stories), str(tmp_path / "given"), 400)
    out = tmp_path / "out"
    script.main(["--out", str(out), "--json-dir", str(tmp_path / "json"), "--tokenizer", given, "--workers", "1"])
    assert (out / "tok400.model").exists()
    splits = tinystories(root=str(out), max_seq_len=16, vocab_size=400)
    assert int(splits.test[0][0][0]) == 1  # the test split starts with the first story's BOS


def test_tinystories_needs_a_test_and_a_train_shard(tmp_path):
    (tmp_path / "tok512").mkdir()
    np.ones(100, dtype=np.uint16).tofile(tmp_path / "tok512" / "data00.bin")
    with pytest.raises(FileNotFoundError, match="1 data\\*.bin shards"):
        tinystories(root=str(tmp_path))


# ---------------------------------------------------------------------------- text corpus and windows


def test_text_corpus_byte_level(tmp_path):
    path = tmp_path / "corpus.txt"
    text = "".join(f"Line {i}: naïve café, the quick brown fox.\n" for i in range(200))
    path.write_text(text, encoding="utf-8")
    splits = text_corpus(str(path), batch_size=8, max_seq_len=64, vocab_size=256, cache_dir=str(tmp_path / "cache"))
    assert splits.model_kwargs == {"vocab_size": 256, "max_seq_len": 64}
    # the last 10% of the text, moved back to the line break before it, is the test split
    train_bytes = len(text[: text.index("Line 180:")].encode("utf-8"))
    assert len(splits.train) == (train_bytes - 1) // 64
    x, y = splits.train[1]
    assert bytes(x.tolist()) == text.encode("utf-8")[64:128]
    assert torch.equal(x[1:], y[:-1])
    test_x, _ = splits.test[0]
    assert bytes(test_x.tolist()).decode("utf-8").startswith("Line 180:")  # the split falls on a line break


def test_text_corpus_sentencepiece_vocabulary_is_cached(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(s.strip() + "\n" for s in make_stories(np.random.default_rng(2), 400)))
    cache = tmp_path / "cache"
    splits = text_corpus(str(path), max_seq_len=32, vocab_size=400, cache_dir=str(cache))
    (folder,) = cache.iterdir()
    assert sorted(os.listdir(folder)) == ["test.bin", "tok400.model", "tok400.vocab", "train.bin"]
    for dataset in (splits.train, splits.test):
        x, y = dataset[0]
        assert torch.equal(x[1:], y[:-1]) and int(torch.cat([x, y]).max()) < 400
    built = os.path.getmtime(folder / "train.bin")
    text_corpus(str(path), max_seq_len=32, vocab_size=400, cache_dir=str(cache))
    assert os.path.getmtime(folder / "train.bin") == built  # reused, not rebuilt
    path.write_text(path.read_text() + "A new line.\n")
    text_corpus(str(path), max_seq_len=32, vocab_size=400, cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 2  # a changed file gets its own cache


def test_token_windows_bounds_and_pickling(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    windows = TokenWindows(str(path), max_seq_len=10)
    assert len(windows) == 9  # 99 tokens can serve as inputs, and each window needs one more
    x, y = windows[8]
    assert x.tolist() == list(range(80, 90)) and y.tolist() == list(range(81, 91))
    with pytest.raises(IndexError):
        windows[9]
    # a DataLoader worker gets the file name, not a copy of the tokens
    assert len(pickle.dumps(windows)) < 500
    assert pickle.loads(pickle.dumps(windows))[8][1].tolist() == y.tolist()
    with pytest.raises(ValueError, match="too few"):
        TokenWindows(str(path), max_seq_len=100)


def test_prepare_text_from_jsonl(tmp_path):
    source = tmp_path / "kjv.jsonl"
    verses = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void."]
    source.write_text(
        "".join(json.dumps({"citation": f"Gen 1:{i + 1}", "text": v}) + "\n" for i, v in enumerate(verses))
    )
    out = tmp_path / "text" / "kjv.txt"
    load_script("prepare_text").main(["--out", str(out), "--jsonl", str(source)])
    assert out.read_text().splitlines() == verses


# ---------------------------------------------------------------------------- damaged data files


def test_a_truncated_jpeg_is_named_when_read(tmp_path):
    """ImageFolder reads images lazily: the damaged file is named at its first use, in a worker too."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (tmp_path / split / wnid).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / split / wnid / "a.JPEG")
    damaged = tmp_path / "train" / "n01443537" / "a.JPEG"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    splits = imagenet(root=str(tmp_path), batch_size=2)
    splits.train[0]  # the good image still reads
    for workers in (0, 1):
        with pytest.raises(OSError, match=rf"{damaged} cannot be read as an image \(OSError: .*\): replace it"):
            list(DataLoader(splits.train, batch_size=2, num_workers=workers))


def fashion_mnist_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    write_idx_gz(src, "train", rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12, dtype=np.uint8) % 10)
    write_idx_gz(src, "t10k", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5, dtype=np.uint8))
    load_script("prepare_fashion_mnist").prepare(str(src), str(tmp_path / "fashion_mnist"))
    return tmp_path / "fashion_mnist"


@pytest.mark.parametrize(
    "name, damage, problem",
    [
        ("train-labels-idx1-ubyte", lambda data: bytes(np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8)),
         "it does not start with the IDX header"),
        ("train-images-idx3-ubyte", lambda data: data[: len(data) - 100], r"it holds 9324 bytes where its header \(12, 28, 28\) needs 9424"),
        ("t10k-labels-idx1-ubyte", lambda data: data[:-1] + bytes([200]), "it holds the label 200, outside the 10 classes"),
    ],
)
def test_a_damaged_fashion_mnist_file_is_named(tmp_path, name, damage, problem):
    root = fashion_mnist_root(tmp_path)
    path = root / "FashionMNIST" / "raw" / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"(?s){path} is damaged: {problem}.*prepare_fashion_mnist.py"):
        fashion_mnist(root=str(root))


def test_a_tinystories_shard_with_a_token_outside_the_vocabulary_is_named(tmp_path):
    (tmp_path / "tok512").mkdir()
    np.ones(1000, dtype=np.uint16).tofile(tmp_path / "tok512" / "data00.bin")
    tokens = np.ones(1000, dtype=np.uint16)
    tokens[77] = 60000
    tokens.tofile(tmp_path / "tok512" / "data01.bin")
    shard = tmp_path / "tok512" / "data01.bin"
    with pytest.raises(ValueError, match=rf"(?s){shard} holds token id 60000 at position 77, outside the vocabulary of "
                                         r"512 .*--vocab-size 512"):
        tinystories(root=str(tmp_path), max_seq_len=16, vocab_size=512)
    shard.write_bytes(np.ones(1000, dtype=np.uint16).tobytes()[:-1])  # cut mid-token
    with pytest.raises(ValueError, match=rf"{shard} holds 1999 bytes, not a whole number of uint16 tokens"):
        tinystories(root=str(tmp_path), max_seq_len=16, vocab_size=512)


def test_a_text_corpus_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nun caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text: byte 0xe9 at offset 17 \(line 2\): invalid "
                                         r"continuation byte. Convert the file, e.g. iconv"):
        text_corpus(str(path), cache_dir=str(tmp_path / "cache"))
