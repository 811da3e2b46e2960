"""shards.py: the shard format (exact bytes, round trip), its checks, the one vocabulary limit."""
import numpy as np
import pytest

import shards


@pytest.fixture
def shard(tmp_path):
    """A shard of 1000 random tokens below 50000, and the tokens."""
    tokens = np.random.default_rng(0).integers(0, 50000, size=1000)
    shards.write_shard(tmp_path / "a.bin", tokens, 50000, "ab" * 32)
    return tmp_path / "a.bin", tokens


def test_round_trip(shard):
    path, tokens = shard
    assert np.array_equal(shards.read_shard(path, 50000), tokens)
    assert shards.shard_header(path) == (50000, 1000, "ab" * 8)
    assert not list(path.parent.glob("*.tmp*"))


def test_layout_is_a_1024_byte_header_then_uint16(shard):
    path, tokens = shard
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2000 and np.array_equal(np.frombuffer(raw[1024:], "<u2"), tokens)
    header = np.frombuffer(raw[:1024], "<i4")
    assert header[0] == 0x6B696C6E and header[1] == 1 and header[2] == 50000
    assert np.frombuffer(raw[12:20], "<i8")[0] == 1000 and raw[20:28] == bytes.fromhex("ab" * 8)


@pytest.mark.parametrize("cut", [2, 2924])  # one token short; shorter than the header
def test_truncated_shard_refused(shard, tmp_path, cut):
    raw = shard[0].read_bytes()
    (tmp_path / "trunc.bin").write_bytes(raw[:-cut])
    with pytest.raises(ValueError, match="truncated"):
        shards.read_shard(tmp_path / "trunc.bin")


def test_wrong_magic_refused(shard, tmp_path):
    (tmp_path / "magic.bin").write_bytes(b"\0\0\0\0" + shard[0].read_bytes()[4:])
    with pytest.raises(ValueError, match="magic"):
        shards.read_shard(tmp_path / "magic.bin")


def test_model_vocab_must_match(shard):
    with pytest.raises(ValueError, match="vocab_size 50000 but the model has 32768"):
        shards.read_shard(shard[0], vocab_size=32768)


def test_vocab_over_uint16_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        shards.write_shard(tmp_path / "big.bin", np.arange(10), 70000, "ab" * 32)
    assert not (tmp_path / "big.bin").exists()


def test_check_vocab_limit_is_exactly_uint16():
    shards.check_vocab(2**16, "a tokenizer")  # ids 0..65535 fit
    with pytest.raises(ValueError, match=r"vocab_size 65537 of a tokenizer is over 65536.*uint16"):
        shards.check_vocab(2**16 + 1, "a tokenizer")
    assert shards.MAX_VOCAB == np.iinfo(np.uint16).max + 1
