"""shards.py: one-line errors for truncated shards, a broken meta.json and token ids beyond vocab_size; the test split."""

import os

import numpy as np
import pytest
import torch

from shards import DataError, TokenWindows, read_meta, read_shard, write_shard


@pytest.mark.parametrize("size", [0, 100, 1023])
def test_a_shard_shorter_than_its_header_is_called_truncated(tmp_path, size):
    path = str(tmp_path / "train_000000.bin")
    write_shard(path, np.arange(1000))
    with open(path, "r+b") as f:
        f.truncate(size)
    with pytest.raises(DataError) as e:
        read_shard(path)
    message = str(e.value)
    assert f"{path} is truncated: it has {size} bytes" in message and "1024-byte header" in message
    assert "magic" not in message and "prepare" in message and "\n" not in message
    if size >= 12:  # the header's token count survives: say what the whole file needs
        assert "1000 tokens" in message and "3024 bytes" in message


def test_a_short_file_that_is_no_shard_is_still_called_so(tmp_path):
    path = tmp_path / "val_000000.bin"
    path.write_bytes(b"hello, not a shard" * 5)
    with pytest.raises(DataError, match="is not a token shard"):
        read_shard(str(path))


@pytest.mark.parametrize("text", ['{"vocab_size": 64', "[64]", "\xff\xfe"])
def test_read_meta_that_is_not_a_json_object_is_one_clear_error(tmp_path, text):
    (tmp_path / "meta.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_meta(str(tmp_path))
    assert str(tmp_path / "meta.json") in str(e.value) and "prepare" in str(e.value) and "\n" not in str(e.value)


def test_token_ids_at_or_above_vocab_size_are_named_with_their_shard(tmp_path):
    write_shard(str(tmp_path / "train_000000.bin"), np.arange(100) % 50)
    write_shard(str(tmp_path / "train_000001.bin"), np.r_[np.arange(100) % 50, 70])
    TokenWindows(str(tmp_path), "train", 8)  # no vocab_size: no check
    TokenWindows(str(tmp_path), "train", 8, vocab_size=71)
    with pytest.raises(DataError) as e:
        TokenWindows(str(tmp_path), "train", 8, vocab_size=64)
    message = str(e.value)
    assert str(tmp_path / "train_000001.bin") in message and "token id 70" in message and "vocab_size is 64" in message
    assert "prepare the data again" in message and "at least 71" in message


def test_vocab_check_is_one_max_per_shard(tmp_path, monkeypatch):
    for i in range(3):
        write_shard(str(tmp_path / f"val_{i:06d}.bin"), np.arange(50))
    calls, real_max = [], np.ndarray.max
    monkeypatch.setattr(np.memmap, "max", lambda self, *a, **k: calls.append(len(self)) or real_max(self, *a, **k))
    TokenWindows(str(tmp_path), "val", 8, vocab_size=64)
    assert calls == [50, 50, 50]


def test_test_split_windows(tmp_path):
    write_shard(str(tmp_path / "val_000000.bin"), np.arange(40))
    with pytest.raises(DataError, match="--test_tokens"):
        TokenWindows(str(tmp_path), "test", 8)
    write_shard(str(tmp_path / "test_000000.bin"), np.arange(100, 140))
    test = TokenWindows(str(tmp_path), "test", 8, vocab_size=140)
    x, y = test.windows(test.draw(5, torch.Generator().manual_seed(0)))
    assert x.shape == (5, 8) and bool(((x >= 100) & (y == x + 1)).all())
