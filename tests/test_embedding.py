import torch

from soma_lightning.nn.embedding import HashedNgramEmbedding


def test_same_ngram_gets_the_same_rows_wherever_it_ends():
    emb = HashedNgramEmbedding(8, ngram_sizes=(3,), num_tables=2, buckets=1000)
    tokens = torch.tensor([list(b"the cat, the dog")])
    ids = emb.bucket_ids(tokens)
    # "the" ends at index 2 and at index 11
    assert all(t[0, 2] == t[0, 11] for t in ids)
    assert ids[0][0, 2] != ids[0][0, 3]
    assert not torch.equal(ids[0], ids[1])  # the two tables hash differently


def test_positions_before_the_start_are_a_boundary_not_a_byte():
    emb = HashedNgramEmbedding(8, ngram_sizes=(2,), num_tables=1, buckets=10**6)
    start = emb.bucket_ids(torch.tensor([[5, 7]]))[0]
    inside = emb.bucket_ids(torch.tensor([[0, 5, 7]]))[0]
    assert start[0, 1] == inside[0, 2]  # (5, 7) either way
    assert start[0, 0] != inside[0, 1]  # (boundary, 5) differs from (0, 5)


def test_deterministic_across_instances_and_sums_all_tables():
    a = HashedNgramEmbedding(4, ngram_sizes=(2, 4), num_tables=3, buckets=64)
    b = HashedNgramEmbedding(4, ngram_sizes=(2, 4), num_tables=3, buckets=64)
    tokens = torch.randint(0, 256, (2, 30))
    assert all(torch.equal(x, y) for x, y in zip(a.bucket_ids(tokens), b.bucket_ids(tokens)))
    expected = sum(t(i) for t, i in zip(a.tables, a.bucket_ids(tokens)))
    torch.testing.assert_close(a(tokens), expected)
    assert len(a.tables) == 6
