import pytest
import torch

from soma_lightning import SpecError, build_model
from soma_lightning.errors import UserError
from soma_lightning.lm import SomaLM
from soma_lightning.nn.embedding import ModalityEmbedding
from soma_lightning.spec import ModelSpec
from soma_lightning.token_space import check_token_ids
from conftest import tiny_v1_arch

RANGES = {"text": [0, 256], "specials": [256, 264], "image": [264, 520], "audio": [520, 776]}


@pytest.mark.parametrize(
    "ranges, message",
    [
        ({"text": [0, 300], "image": [264, 520]}, "model.arch.vocab_ranges.image: overlaps text"),
        ({"text": [0, 1000]}, "model.arch.vocab_ranges.text: [0, 1000) must satisfy 0 <= start < end <= vocab_size (776)"),
        ({"text": [5]}, "model.arch.vocab_ranges.text: expected [start, end) as two ints"),
    ],
)
def test_bad_ranges_are_spec_errors(ranges, message):
    arch = tiny_v1_arch()
    arch |= {"vocab_size": 776, "vocab_ranges": ranges}
    with pytest.raises(SpecError) as e:
        build_model(arch)
    assert str(e.value).startswith(message)


def test_ids_outside_the_token_space_are_named():
    check_token_ids(torch.tensor([[1, 300, 600]]), 776, RANGES, "batch")
    with pytest.raises(UserError, match=r"batch: token id 800 at index \[0, 2\] is outside the token space: text \[0, 256\)"):
        check_token_ids(torch.tensor([[1, 2, 800]]), 776, RANGES, "batch")
    with pytest.raises(UserError, match=r"token id 700 at index \[1, 0\] is outside the token space: text \[0, 10\)"):
        check_token_ids(torch.tensor([[1, 2], [700, 3]]), 776, {"text": [0, 10], "image": [600, 650]}, "batch")
    with pytest.raises(UserError, match=r"token id -1 .* \[0, 264\)"):
        check_token_ids(torch.tensor([[-1]]), 264, None, "batch")


def test_module_refuses_a_batch_before_it_reaches_the_embedding():
    arch = ModelSpec(**(tiny_v1_arch() | {"vocab_size": 776, "vocab_ranges": RANGES, "input_embeddings": ["modality"]}))
    module = SomaLM(arch)
    batch = {"tokens": torch.tensor([[3, 300, 900]]), "targets": torch.zeros(1, 3, dtype=torch.long), "positions": torch.arange(3)[None]}
    with pytest.raises(UserError, match="token id 900"):
        module.on_before_batch_transfer(batch, 0)
    batch["tokens"][0, 2] = 700
    assert module.on_before_batch_transfer(batch, 0) is batch


def test_modality_embedding_adds_one_vector_per_range():
    emb = ModalityEmbedding(8, RANGES)
    out = emb(torch.tensor([[0, 255, 256, 300, 775]]))
    table = emb.table.weight
    for i, row in enumerate([0, 0, 1, 2, 3]):
        assert torch.equal(out[0, i], table[row])
    with pytest.raises(ValueError, match="vocab_ranges"):
        ModalityEmbedding(8, None)
