"""k-NN with temperature-weighted votes, checked against scikit-learn on random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier
from torch.overrides import TorchFunctionMode

import evaluators.knn as knn
from evaluators.knn import knn_predict, knn_predictions, nearest_neighbours
from tests.evaluators.test_linear import MetaDevice


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (10, 0.07), (20, 0.5), (50, 0.07)])
def test_matches_sklearn_weighted_cosine_knn(k: int, temperature: float) -> None:
    rng = np.random.default_rng(k)
    centres = rng.standard_normal((5, 16))
    train_labels = rng.integers(0, 5, 400)
    train = centres[train_labels] + 1.2 * rng.standard_normal((400, 16))
    query_labels = rng.integers(0, 5, 150)
    queries = centres[query_labels] + 1.2 * rng.standard_normal((150, 16))

    # cosine distance d = 1 - s, so DINO's vote weight exp(s / T) is exp((1 - d) / T)
    reference = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute",
        weights=lambda d: np.exp((1 - d) / temperature),
    ).fit(train, train_labels).predict(queries)
    ours = knn_predict(
        torch.from_numpy(train).float(), torch.from_numpy(train_labels), torch.from_numpy(queries).float(),
        k=k, temperature=temperature, num_classes=5, chunk_size=64,
    ).numpy()
    np.testing.assert_array_equal(ours, reference)
    assert (ours == query_labels).mean() > 0.5  # the task is learnable, so the check has teeth


@pytest.mark.parametrize("bank_chunk_size", [None, 7, 59])
def test_every_k_from_one_pass_votes_as_sklearn(bank_chunk_size: int | None) -> None:
    """Several k share one similarity pass (each votes with the first k of the largest k's sorted
    neighbours): the same labels as scikit-learn's classifier fitted per k, the bank whole or in
    chunks (7 rows: fewer than most k; 59: not dividing the 300)."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((4, 8))
    train_labels = rng.integers(0, 4, 300)
    train = centres[train_labels] + 1.5 * rng.standard_normal((300, 8))
    queries = centres[rng.integers(0, 4, 90)] + 1.5 * rng.standard_normal((90, 8))
    ks = (1, 5, 20, 60)
    ours = knn_predictions(torch.from_numpy(train).float(), torch.from_numpy(train_labels),
                           torch.from_numpy(queries).float(), ks, temperature=0.1, num_classes=4, chunk_size=32,
                           bank_chunk_size=bank_chunk_size)
    for k in ks:
        reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                         weights=lambda d: np.exp((1 - d) / 0.1)).fit(train, train_labels)
        np.testing.assert_array_equal(ours[k].numpy(), reference.predict(queries), err_msg=f"k={k}")
    assert len({tuple(p.tolist()) for p in ours.values()}) > 1  # the ks disagree somewhere: slicing is checked


def test_bad_arguments_are_named() -> None:
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="k must be in \\[1, 10\\], got 11"):
        knn_predict(x, y, x, k=11)
    with pytest.raises(ValueError, match="feature widths differ: 4 vs 3"):
        knn_predict(x, y, torch.randn(2, 3), k=1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_predict(x, y, x, k=1, temperature=0)
    with pytest.raises(ValueError, match="bank_chunk_size must be >= 1 or None, got 0"):
        knn_predictions(x, y, x, (1,), bank_chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1 or None, got 0"):
        nearest_neighbours(x, x, 1, chunk_size=0)


@pytest.mark.parametrize("bank_chunk_size", [1, 3, 7, 50, 301, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_bank_in_chunks_gives_the_whole_banks_neighbours(bank_chunk_size: int, dtype: torch.dtype) -> None:
    """Chunk by chunk (of 1 row, fewer than k, not dividing the 301, the whole bank, more), every
    query's k neighbours are those of its similarities to the whole bank at once: the same train
    rows in the same order, the same similarities up to float32 rounding (BLAS picks its kernel,
    so its order of sums, by the product's shape: one train row is a matrix-vector product).
    float64 features are copied to float32 and normalised in place; float32 ones are the caller's,
    left alone."""
    generator = torch.Generator().manual_seed(5)
    train = torch.randn(301, 16, generator=generator, dtype=dtype)
    queries = torch.randn(90, 16, generator=generator, dtype=dtype)
    kept = train.clone()
    similarity, index = nearest_neighbours(train, queries, 20, chunk_size=13, bank_chunk_size=bank_chunk_size)
    whole = F.normalize(queries.float(), dim=1) @ F.normalize(train.float(), dim=1).T  # (90, 301)
    expected_similarity, expected_index = whole.topk(20, dim=1)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(similarity, expected_similarity, rtol=0, atol=2e-7)  # a float32 ulp or two
    assert torch.equal(train, kept)


class Tables(TorchFunctionMode):
    """Records the shape of every matrix product (the similarities to a chunk of the bank) and of
    every table of zeros made (the votes) while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.products: list[tuple[int, ...]] = []
        self.zeros: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.matmul:  # what `a @ b` calls
            self.products.append(tuple(out.shape))
        if func is torch.zeros:
            self.zeros.append(tuple(out.shape))
        return out


def test_the_bank_comes_in_chunks_by_bytes_each_met_by_every_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no chunk sizes, the bank comes in chunks of DEVICE_CHUNK_BYTES (200 rows of 64 float32
    here) and every query (one group: their features and top 25 fit those bytes) meets a chunk, in
    blocks whose similarities stay under MAX_SIMILARITIES (16 x 200), before the next chunk comes;
    the votes of 100 classes are cast 32 queries at a time. The predictions are those of one block
    of queries against the whole bank."""
    generator = torch.Generator().manual_seed(3)
    train, queries = torch.randn(500, 64, generator=generator), torch.randn(70, 64, generator=generator)
    labels = torch.randint(0, 6, (500,), generator=generator)
    whole = knn_predictions(train, labels, queries, (5, 25), num_classes=100, chunk_size=70, bank_chunk_size=500)
    monkeypatch.setattr(knn, "DEVICE_CHUNK_BYTES", 200 * 64 * 4)
    monkeypatch.setattr(knn, "MAX_SIMILARITIES", 200 * 16)
    with Tables() as tables:
        chunked = knn_predictions(train, labels, queries, (5, 25), num_classes=100, device="cpu")
    chunk = [(16, 200)] * 4 + [(6, 200)]  # the 70 queries against one chunk
    assert tables.products == chunk + chunk + [(16, 100)] * 4 + [(6, 100)]  # the last chunk: the 100 left
    assert tables.zeros == [(32, 100)] * 4 + [(6, 100)] * 2  # each block's votes, for k = 5 and 25
    for k in (5, 25):
        torch.testing.assert_close(chunked[k], whole[k], rtol=0, atol=0)


def test_the_device_receives_a_chunk_of_the_bank_at_a_time_and_the_bank_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the meta device standing in for a GPU, with chunks of 300 rows' bytes: the host's 1000
    train features (ImageNet's ViT-g/14 CLS: 7.9 GB) cross 300 rows at a time, once in all, after
    the 150 queries (one group: their features and top 20 fit a chunk's bytes); a bank on the
    device already does not cross at all."""
    monkeypatch.setattr(knn, "DEVICE_CHUNK_BYTES", 300 * 64 * 4)
    generator = torch.Generator().manual_seed(4)
    train = torch.randn(1000, 64, generator=generator, dtype=torch.float64)
    queries, labels = torch.randn(150, 64, generator=generator), torch.randint(0, 5, (1000,), generator=generator)
    with MetaDevice() as device:
        predictions = knn_predictions(train, labels, queries, (5, 20), device="meta")
    assert [rows for rows, *width in device.sent if width == [64]] == [150, 300, 300, 300, 100]
    assert predictions[20].shape == (150,)
    on_device = train.to("meta")
    with MetaDevice() as device:
        knn_predictions(on_device, labels, queries, (5, 20), device="meta")
    assert [rows for rows, *width in device.sent if width == [64]] == [150]  # the queries alone
