import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from soma_lightning.data_modules import EOS, PAD, ByteCorpus
from soma_lightning.data_modules.byte_corpus import DataError, RandomWindows


def _text(tmp_path, name="a.txt", text="hello world, " * 200):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_embedded_default_is_tiny_shakespeare_split_90_10():
    dm = ByteCorpus()
    dm.setup("fit")
    assert len(dm.train_stream) == 1_003_854 and len(dm.val_stream) == 111_540
    assert bytes(dm.train_stream[:9].astype(np.uint8)) == b"First Cit"


def test_validation_batches_follow_the_contract(tmp_path):
    dm = ByteCorpus(source=str(_text(tmp_path, text="x" * 5000)), val_fraction=0.5)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [len(b["tokens"]) for b in batches] == [3]  # 2500 bytes -> 3 chunks of 1024
    last = batches[0]
    assert last["tokens"][2, 2500 - 2048] == EOS and last["positions"][2, -1] == 2500


def test_training_windows_are_deterministic_and_resumable(tmp_path):
    stream = np.arange(1000, dtype=np.uint16) % 256
    a = RandomWindows([stream], seq_len=16, batch_size=4, seed=3)
    batches = [b for _, b in zip(range(5), a)]
    resumed = RandomWindows([stream], seq_len=16, batch_size=4, seed=3, start_batch=3)
    assert torch.equal(next(iter(resumed))["tokens"], batches[3]["tokens"])
    b = batches[0]
    assert torch.equal(b["targets"][:, :-1], b["tokens"][:, 1:]) and (b["targets"][:, -1] == PAD).all()
    assert torch.equal(b["tokens"], torch.from_numpy(stream.astype(np.int64))[b["positions"]])
    other_seed = next(iter(RandomWindows([stream], seq_len=16, batch_size=4, seed=4)))
    assert not torch.equal(other_seed["tokens"], batches[0]["tokens"])


def test_global_batch_is_split_across_ranks(tmp_path):
    stream = np.arange(5000, dtype=np.uint16) % 256
    whole = RandomWindows([stream], 8, 4, seed=1, world_size=1).batch(7)["positions"]
    halves = [RandomWindows([stream], 8, 2, seed=1, rank=r, world_size=2).batch(7)["positions"] for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)


def test_folder_and_glob_join_documents_with_eos(tmp_path):
    _text(tmp_path, "a.txt", "aaaa")
    _text(tmp_path, "b.txt", "bbbb")
    for source in (str(tmp_path), str(tmp_path / "*.txt")):
        dm = ByteCorpus(source=source, val_fraction=0.5, seq_len=2)
        dm.setup("fit")
        assert np.concatenate([dm.train_stream, dm.val_stream]).tolist() == [97] * 4 + [EOS] + [98] * 4


def test_hf_json_source_reads_the_named_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i} " * 20, "id": i}) for i in range(10)))
    dm = ByteCorpus(source=str(path), hf_format="json", text_column="body", seq_len=8)
    dm.setup("fit")
    stream = np.concatenate([dm.train_stream, dm.val_stream])
    assert (stream == EOS).sum() == 9
    with pytest.raises(DataError, match="has no column 'text'; columns: body, id"):
        ByteCorpus(source=str(path), hf_format="json").setup("fit")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "/no/such/file.txt"}, "data.source: '/no/such/file.txt' is no file or directory and matches no file as a glob"),
        ({"source": "/no/such/*.txt"}, "matches no file"),
        ({"val_fraction": 1.5}, "data.val_fraction: must be in (0, 1)"),
        ({"seq_len": 0}, "data.seq_len: must be positive"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(DataError) as e:
        ByteCorpus(**kwargs)
    assert message in str(e.value)


def test_empty_inputs_fail_in_setup(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="holds no data"):
        ByteCorpus(source=str(empty)).setup("fit")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        ByteCorpus(source=str(tmp_path / "dir"))
    with pytest.raises(DataError, match="data.val_source: .* holds no data"):
        ByteCorpus(source=str(_text(tmp_path, "s.txt")), val_source=str(empty)).setup("fit")
    with pytest.raises(DataError, match="data.seq_len: the train split has 8 tokens, fewer than seq_len 16"):
        ByteCorpus(source=str(_text(tmp_path, "s.txt", "abcdefghi")), val_fraction=0.1, seq_len=16).setup("fit")


def test_document_ids_grow_after_each_eos(tmp_path):
    from soma_lightning.data_modules.byte_corpus import document_ids

    tokens = torch.tensor([[1, EOS, 2, 3, EOS, EOS, 4]])
    assert document_ids(tokens).tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    _text(tmp_path, "a.txt", "a" * 30)
    _text(tmp_path, "b.txt", "b" * 30)
    dm = ByteCorpus(source=str(tmp_path), seq_len=20, batch_size=8, val_seq_len=16, doc_ids=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["doc_ids"], document_ids(batch["tokens"]))
    assert "doc_ids" in next(iter(dm.val_dataloader()))


def test_structure_annotation(tmp_path):
    from soma_lightning.data_modules.structure import batch_structure

    _text(tmp_path, "code.py", "def f(x):\n    return (x + 1)\n" * 20)
    dm = ByteCorpus(source=str(tmp_path / "code.py"), seq_len=32, batch_size=2, val_seq_len=32, structure=True)
    dm.setup("fit")
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        assert torch.equal(batch["structure"], batch_structure(batch["tokens"]))
        assert batch["structure"].shape == (*batch["tokens"].shape, 8)


def test_data_modules_do_not_import_the_model_code():
    """The data modules need only the light modules of the package: not spec.py, which imports every nn module."""
    code = "import sys, soma_lightning.data_modules; print(' '.join(m for m in sys.modules if m.startswith('soma_lightning.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "soma_lightning.data_modules.multimodal" in loaded
    assert [m for m in loaded if m == "soma_lightning.spec" or m.startswith("soma_lightning.nn")] == []
