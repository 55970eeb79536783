"""Put Fashion-MNIST where torchvision looks for it: gunzip the four IDX files into out/FashionMNIST/raw/.

    apt-get install dataset-fashion-mnist            # Debian's package: the full 60k/10k set, MIT
    python scripts/prepare_fashion_mnist.py --out data/fashion_mnist

--src takes any folder with the four .gz files (e.g. downloaded from zalandoresearch/fashion-mnist).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil

from experiments.data.images import FASHION_MNIST_FILES
from experiments.files import atomic_write

DEBIAN_SRC = "/usr/share/datasets/fashion-mnist"


def prepare(src: str, out: str) -> str:
    """Gunzip src/<name>.gz into out/FashionMNIST/raw/<name> for the four IDX files; returns the raw folder."""
    missing = [name + ".gz" for name in FASHION_MNIST_FILES if not os.path.exists(os.path.join(src, name + ".gz"))]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}; on Debian: apt-get install dataset-fashion-mnist")
    raw = os.path.join(out, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        # atomically: a killed copy leaves no partial file for the Makefile to take as prepared
        with (
            gzip.open(os.path.join(src, name + ".gz"), "rb") as packed,
            atomic_write(os.path.join(raw, name), "wb") as unpacked,
        ):
            shutil.copyfileobj(packed, unpacked)
    return raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=DEBIAN_SRC, help="folder holding the four *-ubyte.gz files")
    parser.add_argument("--out", default="data/fashion_mnist", help="the dataset's root")
    args = parser.parse_args(argv)
    print(f"wrote {prepare(args.src, args.out)}")


if __name__ == "__main__":
    main()
