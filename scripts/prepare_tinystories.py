"""Download, tokenise and shard TinyStories the way llama2.c's tinystories.py does.

    python scripts/prepare_tinystories.py --out data/tinystories                    # download, vocab 512
    python scripts/prepare_tinystories.py --out data/tinystories --archive TinyStories_all_data.tar.gz
    python scripts/prepare_tinystories.py --out data/tinystories --json-dir TinyStories_all_data/
    python scripts/prepare_tinystories.py --out data/tinystories --tokenizer tokenizer.model   # Llama 2, vocab 32000

Steps: (1) fetch TinyStories_all_data.tar.gz (1.6 GB) into out/ unless an archive or a folder of
JSON shards is given; (2) unpack it into out/TinyStories_all_data/data00.json ... data49.json;
(3) train a SentencePiece BPE vocabulary on the first 10 shards with llama2.c's options, or copy
a given tokenizer.model; (4) encode every story with BOS = 1 in front and write each shard as a
flat uint16 file out/tok{V}/dataNN.bin. experiments.data.tinystories(root=out, vocab_size=V) reads them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tarfile
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import numpy as np
import sentencepiece as spm

from experiments.data.text import train_tokenizer, write_tokens

URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
VOCAB_SHARDS = 10  # llama2.c trains the vocabulary on the first 10 of the 50 shards, for speed


def download(url: str, archive: str) -> None:
    """Fetch url into archive unless it is there already."""
    if os.path.exists(archive):
        print(f"{archive} already exists, skipping the download")
        return
    print(f"downloading {url} to {archive} ...")

    def report(blocks: int, block_size: int, total: int) -> None:
        if blocks % 12800 == 0:  # every 100 MB of 8 KB blocks
            print(f"  {blocks * block_size / 2**20:,.0f} of {total / 2**20:,.0f} MB", flush=True)

    urllib.request.urlretrieve(url, archive + ".part", reporthook=report)
    os.replace(archive + ".part", archive)


def unpack(archive: str, json_dir: str) -> None:
    """Extract the JSON shards of archive into json_dir."""
    print(f"unpacking {archive} into {json_dir} ...")
    os.makedirs(json_dir, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(json_dir, filter="data")


def read_stories(shard: str) -> list[str]:
    """The stripped "story" fields of one JSON shard (a list of dicts)."""
    with open(shard, encoding="utf-8") as f:
        return [example["story"].strip() for example in json.load(f)]


def train_vocab(shards: list[str], out: str, vocab_size: int) -> str:
    """Train the vocabulary on the first VOCAB_SHARDS shards, one story per line; returns out/tok{V}.model."""
    stories_file = os.path.join(out, "tiny.txt")
    with open(stories_file, "w", encoding="utf-8") as f:
        for shard in shards[:VOCAB_SHARDS]:
            f.writelines(story + "\n" for story in read_stories(shard))
    print(f"training a vocabulary of {vocab_size} on {os.path.getsize(stories_file) / 2**20:.1f} MB of stories ...")
    model = train_tokenizer(stories_file, os.path.join(out, f"tok{vocab_size}"), vocab_size)
    os.remove(stories_file)  # llama2.c asks with input(); a script that may run unattended just cleans up
    return model


def tokenize_shard(shard: str, model: str, bin_dir: str) -> str:
    """Encode every story of shard with BOS in front and write them back to back as bin_dir/<shard>.bin."""
    tokenizer = spm.SentencePieceProcessor(model_file=model)
    stories = tokenizer.encode(read_stories(shard), add_bos=True)
    tokens = np.fromiter((t for story in stories for t in story), dtype=np.int64)
    path = os.path.join(bin_dir, os.path.basename(shard).replace(".json", ".bin"))
    write_tokens(tokens, path)
    print(f"wrote {path}: {tokens.size:,} tokens, {tokens.size / len(stories):.1f} per story")
    return path


def pretokenize(shards: list[str], model: str, bin_dir: str, workers: int) -> list[str]:
    """Tokenise all shards in parallel, one process per shard as in llama2.c."""
    os.makedirs(bin_dir, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(partial(tokenize_shard, model=model, bin_dir=bin_dir), shards))


def prepare(
    out: str,
    archive: str | None = None,
    json_dir: str | None = None,
    vocab_size: int = 512,
    tokenizer: str | None = None,
    workers: int | None = None,
) -> list[str]:
    """Run all the steps; returns the .bin shards, sorted (shard 0 is the test split)."""
    os.makedirs(out, exist_ok=True)
    if json_dir is None:
        if archive is None:
            archive = os.path.join(out, "TinyStories_all_data.tar.gz")
            download(URL, archive)
        json_dir = os.path.join(out, "TinyStories_all_data")
        if not glob.glob(os.path.join(json_dir, "*.json")):
            unpack(archive, json_dir)
    shards = sorted(glob.glob(os.path.join(json_dir, "*.json")))
    if len(shards) < 2:
        raise FileNotFoundError(
            f"{json_dir} holds {len(shards)} JSON shards; need 2 or more (shard 0 is the test split)"
        )

    if tokenizer is None:
        model = train_vocab(shards, out, vocab_size)
    else:
        vocab_size = spm.SentencePieceProcessor(model_file=tokenizer).vocab_size()
        model = os.path.join(out, f"tok{vocab_size}.model")
        shutil.copyfile(tokenizer, model)
    if vocab_size > 2**16:
        raise ValueError(f"a vocabulary of {vocab_size} does not fit the uint16 shards")
    return pretokenize(shards, model, os.path.join(out, f"tok{vocab_size}"), workers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/tinystories", help="output folder (the dataset's root)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--archive", help="a local TinyStories_all_data.tar.gz instead of downloading it")
    source.add_argument("--json-dir", help="a folder of already unpacked JSON shards")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--vocab-size", type=int, default=512, help="size of the SentencePiece BPE vocabulary to train")
    vocab.add_argument("--tokenizer", help="an existing SentencePiece model, e.g. llama2.c's tokenizer.model (32000)")
    parser.add_argument("--workers", type=int, default=None, help="processes for tokenising (default: all cores)")
    args = parser.parse_args(argv)
    shards = prepare(args.out, args.archive, args.json_dir, args.vocab_size, args.tokenizer, args.workers)
    print(f"done: {len(shards)} shards in {os.path.dirname(shards[0])}")


if __name__ == "__main__":
    main()
