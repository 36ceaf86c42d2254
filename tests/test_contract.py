"""The V1 data contract (section 3): worked examples and agreement with soma-models' tokenizer."""

import pytest
import torch
from soma_models.v1.tokenizer import tokenize as ref_tokenize

from soma_lightning.data_modules import EOS, PAD, tokenize


def test_one_byte():
    rows = tokenize(b"A")
    assert rows["tokens"].shape == (1, 1024)
    assert rows["tokens"][0, :3].tolist() == [65, EOS, PAD]
    assert rows["targets"][0, :2].tolist() == [EOS, PAD]
    assert rows["positions"][0, :3].tolist() == [0, 1, 1]
    assert int((rows["targets"] != PAD).sum()) == 1


def test_hello():
    rows = tokenize(b"hello")
    assert rows["tokens"][0, :7].tolist() == [104, 101, 108, 108, 111, EOS, PAD]
    assert rows["targets"][0, :7].tolist() == [101, 108, 108, 111, EOS, PAD, PAD]
    assert rows["positions"][0, :7].tolist() == [0, 1, 2, 3, 4, 5, 5]
    assert (rows["positions"][0, 5:] == 5).all() and (rows["tokens"][0, 6:] == PAD).all()
    assert int((rows["targets"] != PAD).sum()) == 5


def test_2048_bytes():
    data = bytes(range(256)) * 8
    rows = tokenize(data)
    assert rows["tokens"].shape == (2, 1024)
    assert not ((rows["tokens"] == EOS) | (rows["tokens"] == PAD)).any()
    assert rows["positions"][1].tolist() == list(range(1024, 2048))
    assert rows["targets"][1].tolist() == list(data[1025:2048]) + [PAD]
    assert int((rows["targets"] != PAD).sum()) == 2046


def test_2049_bytes():
    data = bytes(range(256)) * 8 + b"z"
    rows = tokenize(data)
    assert rows["tokens"].shape == (3, 1024)
    assert rows["tokens"][2, :3].tolist() == [ord("z"), EOS, PAD]
    assert rows["positions"][2, :3].tolist() == [2048, 2049, 2049]
    n = len(data)
    assert int((rows["targets"] != PAD).sum()) == n - 3 + 1


def test_empty_gives_no_rows():
    assert tokenize(b"")["tokens"].shape == (0, 1024)


@pytest.mark.parametrize("n", [1, 5, 1023, 1024, 1025, 3000, 5000])
@pytest.mark.parametrize("seq_len", [1024, 100])
def test_equals_reference_tokenizer(n, seq_len):
    data = bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist())
    ours = tokenize(data, seq_len)
    ref = ref_tokenize(data, seq_len)
    assert ours["tokens"].tolist() == [r.token_ids for r in ref]
    assert ours["targets"].tolist() == [r.targets for r in ref]
    assert ours["positions"].tolist() == [r.pos_ids for r in ref]
