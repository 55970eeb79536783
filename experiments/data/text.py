"""Language-model datasets: TinyStories as llama2.c pre-tokenises it, and any local text file.

Both read flat uint16 token files through TokenWindows: item i is the i-th non-overlapping
window of max_seq_len + 1 tokens, split into input and next-token target. The trainer's
DataLoader shuffles the window indices, which is what llama2.c's PretokDataset does with its
own RNG; a map-style dataset makes the order a function of the sampler's seed, so a resumed
run sees the same batches.
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import NoReturn

import numpy as np
import sentencepiece as spm
import torch
from torch.utils.data import ConcatDataset, Dataset

from experiments.data.common import DataSplits, require
from experiments.files import atomic_write


def train_tokenizer(text_file: str, model_prefix: str, vocab_size: int) -> str:
    """Train a SentencePiece BPE vocabulary on a one-document-per-line file with llama2.c's options.

    Writes model_prefix.model and model_prefix.vocab and returns the .model path. byte_fallback
    makes every string encodable, so vocab_size must leave room for the 256 byte pieces, unk,
    BOS and EOS, and every distinct character of the text (character_coverage=1.0).
    """
    spm.SentencePieceTrainer.train(
        input=text_file,
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        self_test_sample_size=0,
        input_format="text",
        character_coverage=1.0,
        num_threads=os.cpu_count(),
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        unk_surface=r" \342\201\207 ",
        normalization_rule_name="identity",
        minloglevel=2,  # SentencePiece logs every merge to stderr otherwise
    )
    return model_prefix + ".model"


def write_tokens(tokens: np.ndarray, path: str) -> None:
    """Write tokens as a flat uint16 file, atomically, so that concurrent runs never read half a file."""
    if tokens.size and tokens.max() >= 2**16:
        raise ValueError(f"token id {tokens.max()} does not fit in uint16")
    with atomic_write(path, "wb") as f:
        tokens.astype(np.uint16).tofile(f)


def _utf8_bytes(text: str) -> np.ndarray:
    """Byte-level tokens: the UTF-8 encoding of text, a vocabulary of 256."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _raise_not_utf8(path: str) -> NoReturn:
    """Name the first byte of ``path`` that is not UTF-8 (the text decoder's own error names neither file nor line)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path} is not UTF-8 text: byte {raw[error.start]:#04x} at offset {error.start} (line "
                         f"{line}): {error.reason}. Convert the file, e.g. iconv -f latin1 -t utf-8 {path} > "
                         "converted.txt, and pass that one as dataset.path") from None


class TokenWindows(Dataset):
    """Non-overlapping windows of a flat uint16 token file: item i = (tokens[iT : iT+T], tokens[iT+1 : iT+T+1]).

    With ``vocab_size``, every token id is checked to be below it (one pass over the file), so a
    damaged file or one tokenised with another vocabulary is named here, not by an index error
    in the embedding mid-run.
    """

    def __init__(self, path: str, max_seq_len: int, vocab_size: int | None = None, prepare: str = ""):
        self.path = path
        self.max_seq_len = max_seq_len
        size = os.path.getsize(path)
        again = f" Prepare it again with:\n    {prepare}" if prepare else ""
        if size % 2:
            raise ValueError(f"{path} holds {size} bytes, not a whole number of uint16 tokens: it is truncated "
                             f"or not a token file.{again}")
        if vocab_size is not None and size:
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
            if int(tokens.max()) >= vocab_size:
                position = int(np.argmax(tokens >= vocab_size))
                raise ValueError(f"{path} holds token id {int(tokens[position])} at position {position}, outside the "
                                 f"vocabulary of {vocab_size} (dataset.vocab_size): the file is damaged or was "
                                 f"tokenised with another vocabulary.{again}")
        num_tokens = size // 2
        self.num_windows = (num_tokens - 1) // max_seq_len  # each window needs one more token for its last target
        if self.num_windows < 1:
            raise ValueError(f"{path} holds {num_tokens} tokens, too few for one window of {max_seq_len} + 1")
        self._tokens = None  # the memmap, opened on first use in each process

    def __getstate__(self):
        # a pickled memmap is a full in-memory copy; DataLoader workers reopen the file instead
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range for {self.num_windows} windows")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        start = i * self.max_seq_len
        chunk = torch.from_numpy(self._tokens[start : start + self.max_seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def tinystories(
    root: str = "data/tinystories", batch_size: int = 128, max_seq_len: int = 256, vocab_size: int = 512
) -> DataSplits:
    """TinyStories pre-tokenised by scripts/prepare_tinystories.py: root/tok{vocab_size}/data*.bin.

    As in llama2.c, shard 0 is the test split and the other shards are the training split;
    stories are concatenated, each starting with BOS = 1, so a window may span two stories.
    """
    shard_dir = os.path.join(root, f"tok{vocab_size}")
    if vocab_size == 32000:
        prepare = f"python scripts/prepare_tinystories.py --out {root} --tokenizer path/to/llama2/tokenizer.model"
    else:
        prepare = f"python scripts/prepare_tinystories.py --out {root} --vocab-size {vocab_size}"
    require(shard_dir, prepare=prepare)
    shards = sorted(glob.glob(os.path.join(shard_dir, "data*.bin")))
    if len(shards) < 2:
        raise FileNotFoundError(
            f"{shard_dir} holds {len(shards)} data*.bin shards, need 2 or more. Prepare it with:\n    {prepare}"
        )
    return DataSplits(
        train=ConcatDataset([TokenWindows(shard, max_seq_len, vocab_size, prepare) for shard in shards[1:]]),
        test=TokenWindows(shards[0], max_seq_len, vocab_size, prepare),
        batch_size=batch_size,
        model_kwargs={"vocab_size": vocab_size, "max_seq_len": max_seq_len},
    )


def text_corpus(
    path: str,
    batch_size: int = 32,
    max_seq_len: int = 128,
    vocab_size: int = 256,
    test_fraction: float = 0.1,
    cache_dir: str = "data/text_corpus",
) -> DataSplits:
    """A local UTF-8 text file as a language-modelling dataset, for small runs on CPU.

    The last test_fraction of the text (cut at a line break) is the test split. vocab_size=256
    means byte-level tokens (the UTF-8 bytes, no tokenizer); any other size trains a SentencePiece
    BPE vocabulary on the training split with llama2.c's options (see train_tokenizer for the
    smallest size that allows).
    The vocabulary and the token files are cached in cache_dir/<name>-<hash>/, keyed by the
    text, vocab_size and test_fraction, so a changed file or setting gets a fresh cache.
    """
    require(path, prepare=f"python scripts/prepare_text.py --out {path}   (or pass any UTF-8 text file)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        _raise_not_utf8(path)
    key = hashlib.sha1(f"{vocab_size} {test_fraction}\n{text}".encode()).hexdigest()[:12]
    cache = os.path.join(cache_dir, f"{os.path.splitext(os.path.basename(path))[0]}-{key}")
    train_bin, test_bin = os.path.join(cache, "train.bin"), os.path.join(cache, "test.bin")

    if not (os.path.exists(train_bin) and os.path.exists(test_bin)):
        cut = int(len(text) * (1 - test_fraction))
        line_break = text.rfind("\n", 0, cut)
        split = line_break + 1 if line_break >= 0 else cut
        train_text, test_text = text[:split], text[split:]
        os.makedirs(cache, exist_ok=True)
        if vocab_size == 256:
            encode = _utf8_bytes
        else:
            lines_file = os.path.join(cache, f"train.{os.getpid()}.txt")
            with open(lines_file, "w", encoding="utf-8") as f:
                f.write(train_text)
            model = train_tokenizer(lines_file, os.path.join(cache, f"tok{vocab_size}"), vocab_size)
            os.remove(lines_file)
            # each split is encoded as one string: line breaks become byte tokens, and only
            # the start of a split gets SentencePiece's dummy-prefix space
            encode = spm.SentencePieceProcessor(model_file=model).encode
        write_tokens(np.asarray(encode(train_text)), train_bin)
        write_tokens(np.asarray(encode(test_text)), test_bin)

    return DataSplits(
        train=TokenWindows(train_bin, max_seq_len, vocab_size, f"rm -r {cache}   (the next run rebuilds it)"),
        test=TokenWindows(test_bin, max_seq_len, vocab_size, f"rm -r {cache}   (the next run rebuilds it)"),
        batch_size=batch_size,
        model_kwargs={"vocab_size": vocab_size, "max_seq_len": max_seq_len},
    )
