"""k-NN with temperature-weighted votes, checked against scikit-learn on random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from evaluators.knn import knn_predict, knn_predictions


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



def test_every_k_from_one_pass_votes_as_sklearn() -> None:
    """Several k share one similarity pass (each votes with the first k of the largest k's sorted
    neighbours): the same labels as scikit-learn's classifier fitted per k."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((4, 8))
    train_labels = rng.integers(0, 4, 300)
    train = centres[train_labels] + 1.5 * rng.standard_normal((300, 8))
    queries = centres[rng.integers(0, 4, 90)] + 1.5 * rng.standard_normal((90, 8))
    ks = (1, 5, 20, 60)
    ours = knn_predictions(torch.from_numpy(train).float(), torch.from_numpy(train_labels),
                           torch.from_numpy(queries).float(), ks, temperature=0.1, num_classes=4, chunk_size=32)
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


def test_the_chunks_follow_the_train_sets_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no chunk size, a chunk's similarities stay under MAX_SIMILARITIES (queries per chunk
    shrink as the train set grows) and the predictions are those of one big chunk."""
    import evaluators.knn as knn

    generator = torch.Generator().manual_seed(3)
    train, queries = torch.randn(500, 8, generator=generator), torch.randn(70, 8, generator=generator)
    labels = torch.randint(0, 6, (500,), generator=generator)
    whole = knn_predictions(train, labels, queries, (5, 25), chunk_size=70)
    seen: list[int] = []
    original_normalize = knn.F.normalize
    monkeypatch.setattr(knn, "MAX_SIMILARITIES", 500 * 16)  # 16 queries a chunk
    monkeypatch.setattr(knn.F, "normalize", lambda x, dim: seen.append(len(x)) or original_normalize(x, dim=dim))
    chunked = knn_predictions(train, labels, queries, (5, 25), device="cpu")
    assert seen == [500, 16, 16, 16, 16, 6]  # the bank once, then the queries' chunks
    for k in (5, 25):
        torch.testing.assert_close(chunked[k], whole[k], rtol=0, atol=0)
