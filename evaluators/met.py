"""The Met: recognising museum exhibits from visitors' photographs, scored by GAP (the original's
third instance-level benchmark, beside Oxford/Paris and AmsterTime).

The data set (Ypsilantis et al., NeurIPS 2021) holds studio photographs of the Metropolitan
Museum's exhibits, one class per exhibit, and queries taken by visitors; most queries are
distractors (no Met exhibit, or no art at all) that a recogniser should answer with low
confidence. Its release reads here as::

    <root>/ground_truth/MET_database.json   [{"path": "MET/<id>/<n>.jpg", "id": <id>}, ...]
                        (or mini_MET_database.json, the smaller database of the exhibits queried)
    <root>/ground_truth/valset.json, testset.json   [{"path": ..., "MET_id": <id>}, ...]
                        (an entry without MET_id is a distractor)
    <root>/images/<path>

The protocol is the data set's k-NN classifier on L2-normalised global descriptors: of the ``k``
nearest database images each exhibit among them keeps its highest similarity ``s_c``, floored at
0 as the data set's classifier starts every score there, and a softmax over all ``n`` exhibits of
the database, those not among the neighbours at 0, gives the prediction (the nearest neighbour's
exhibit) and its confidence ``p = exp(t s_1) / (sum_c exp(t s_c) + n - u)`` (``u`` exhibits among
the neighbours; the floor matters only to whitened descriptors, whose similarities go negative). ``k`` and
the temperature ``t`` are tuned on the validation queries over the data set's grid, by GAP.

The paper's baselines whiten their descriptors first (``whiten``, off by default): PCA whitening
learned on the database's descriptors alone (its mean, the eigenvectors of its covariance, each
component divided by the square root of its eigenvalue, optionally the largest ``whiten_dim``
kept), applied to the database and both query splits, then L2-normalised again
(:func:`learn_whitening`). A direction every photograph shares (lighting, a studio's backdrop)
then weighs no more in the cosine than one that tells exhibits apart.

GAP (global average precision, micro-averaged over queries) sorts every query's prediction by
confidence and is ``GAP = (1/M) sum_i P(i) rel(i)``: ``P(i)`` the precision of the first ``i``
predictions, ``rel(i)`` 1 where the ``i``-th is right, ``M`` the queries that show an exhibit. A
distractor predicted confidently pushes every right answer below it down the list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoflow.storage import Storage, join_uri
from evaluators.retrieval import file_descriptors, rank_database

K_GRID = (1, 2, 3, 5, 7, 10, 15, 20, 50)  # the data set's tuning grid
TEMPERATURE_GRID = (0.01, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 50.0, 100.0, 500.0)
DISTRACTOR = -1  # a query's label when it shows no exhibit of the database
QUERY_SPLITS = ("val", "test")
WHITENING_EPS = 1e-9  # added to each eigenvalue: a direction of no variance is not divided by 0; unit descriptors'
# eigenvalues sum to at most 1, so this floor leaves the recipe's scaling of any real direction as it is
WHITENING_ROWS = 65536  # database rows centred at a time (in float64) while the covariance adds up


@dataclass(frozen=True)
class MetDataset:
    """The database's image files and exhibit ids, and each query split's files and ids
    (:data:`DISTRACTOR` for distractors); ``database`` names the file read (full or mini)."""

    database: str
    database_files: list[str]
    database_labels: np.ndarray
    query_files: dict[str, list[str]]
    query_labels: dict[str, np.ndarray]


def _entries(storage: Storage, uri: str, label_key: str, required: bool) -> tuple[list[str], np.ndarray]:
    """The ``path`` and ``label_key`` of each entry of a ground-truth JSON list (a missing
    optional label: :data:`DISTRACTOR`)."""
    try:
        entries = json.loads(storage.read_bytes(uri))
        paths = [str(entry["path"]) for entry in entries]
        labels = [int(entry[label_key]) if required or label_key in entry else DISTRACTOR for entry in entries]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{uri}: not a Met ground truth, expected a list of {{\"path\": ..., \"{label_key}\": "
                         f"<exhibit id>}} ({err!r})") from None
    ids = np.asarray(labels, dtype=np.int64)
    if (ids < (0 if required else DISTRACTOR)).any():
        raise ValueError(f"{uri}: exhibit ids must be >= 0 ({DISTRACTOR} marks a distractor in the query sets)")
    return paths, ids


@dataclass(frozen=True)
class Whitening:
    """PCA whitening learned on database descriptors: ``x -> normalize((x - mean) @ projection)``,
    the projection's columns the covariance's eigenvectors (largest eigenvalue first) divided by
    ``sqrt(eigenvalue + eps)``, so the database's whitened descriptors have zero mean and identity
    covariance before the final L2 norm, which puts them back on the cosine faiss ranks by."""

    mean: Tensor  # (D,)
    projection: Tensor  # (D, d)

    def __call__(self, descriptors: Tensor) -> Tensor:
        """Whitened, L2-normalised ``(N, d)`` descriptors of ``(N, D)`` ones."""
        return F.normalize((descriptors.float() - self.mean) @ self.projection, dim=-1)


def learn_whitening(database: Tensor, dim: int | None = None, eps: float = WHITENING_EPS) -> Whitening:
    """:class:`Whitening` learned on database descriptors ``(N, D)``, never on queries (the paper's
    protocol: the queries are what is scored), keeping the ``dim`` components of largest variance
    (None: all ``min(D, N - 1)``; the centred database spans at most ``N - 1`` directions, and one
    beyond them would only scale noise up). Computed in float64: the smallest eigenvalues of unit
    descriptors are tiny, and their square roots divide."""
    rows, width = database.shape
    allowed = min(width, rows - 1)
    if allowed < 1:
        raise ValueError(f"whitening needs at least 2 database descriptors, got {rows}")
    dim = allowed if dim is None else dim
    if not 1 <= dim <= allowed:
        raise ValueError(f"whitening dimension {dim}: allowed 1 to {allowed} (at most the descriptors' {width} "
                         f"dimensions and the database's {rows} images less one)")
    if eps < 0:
        raise ValueError(f"whitening eps must be >= 0, got {eps}")
    mean = database.double().mean(dim=0)
    covariance = torch.zeros(width, width, dtype=torch.float64)
    for start in range(0, rows, WHITENING_ROWS):  # a float64 copy of the Met's 400k descriptors at once: GiBs
        centred = database[start : start + WHITENING_ROWS].double() - mean
        covariance += centred.T @ centred
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance / rows)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0)[:dim], eigenvectors.flip(1)[:, :dim]
    projection = eigenvectors / torch.sqrt(eigenvalues.clamp(min=0) + eps)  # clamp: eigh's -1e-18 of a zero
    return Whitening(mean.float(), projection.float())


def load_met(storage: Storage, root: str) -> MetDataset:
    """Read the Met's ground truth under ``<root>/ground_truth`` (the full database where it is
    there, else the mini one) and name its images under ``<root>/images``."""
    truth = join_uri(root, "ground_truth")
    names = ("MET_database.json", "mini_MET_database.json")
    found = [name for name in names if storage.exists(join_uri(truth, name))]
    missing = [name for name in ("valset.json", "testset.json") if not storage.exists(join_uri(truth, name))]
    if not found or missing:
        raise FileNotFoundError(f"not the Met's ground truth at {truth}: it needs {' or '.join(names)}, valset.json "
                                f"and testset.json (missing: {', '.join(missing or names)})")
    database_paths, database_labels = _entries(storage, join_uri(truth, found[0]), "id", required=True)
    if not database_paths:
        raise ValueError(f"{join_uri(truth, found[0])}: the database is empty")
    files, labels = {}, {}
    for split in QUERY_SPLITS:
        paths, labels[split] = _entries(storage, join_uri(truth, f"{split}set.json"), "MET_id", required=False)
        if not (labels[split] != DISTRACTOR).any():
            raise ValueError(f"{join_uri(truth, f'{split}set.json')}: no query shows an exhibit (GAP divides by "
                             "their number)")
        files[split] = [join_uri(root, "images", path) for path in paths]
    return MetDataset("mini" if found[0].startswith("mini") else "full",
                      [join_uri(root, "images", path) for path in database_paths], database_labels, files, labels)


def knn_recognise(similarities: np.ndarray, neighbour_labels: np.ndarray, num_classes: int,
                  temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and confidences of the Met's k-NN classifier from each query's ``k`` nearest
    neighbours ``(Q, k)``, most similar first, as the data set's own classifier makes them: each
    exhibit among the neighbours scores its best neighbour's similarity floored at 0 (a score starts
    at 0 and only a positive similarity raises it), every other exhibit 0; the confidence is the
    softmax probability at ``temperature`` of the best score over the ``num_classes`` exhibits, the
    prediction its exhibit: the nearest's, or where no neighbour is similar (all scores 0) the
    lowest exhibit among the neighbours."""
    same = neighbour_labels[:, :, None] == neighbour_labels[:, None, :]
    first = ~np.tril(same, k=-1).any(axis=2)  # an exhibit's first (most similar) neighbour
    floored = np.maximum(similarities, 0.0)
    logits = np.where(first, temperature * floored, -np.inf)
    absent = num_classes - first.sum(axis=1)
    with np.errstate(divide="ignore"):  # each absent exhibit adds exp(t x 0); none: log 0
        denominator = np.logaddexp(np.logaddexp.reduce(logits, axis=1), np.log(absent))
    predictions = np.where(similarities[:, 0] > 0, neighbour_labels[:, 0], neighbour_labels.min(axis=1))
    return predictions, np.exp(temperature * floored[:, 0] - denominator)


def gap(predictions: np.ndarray, confidences: np.ndarray, truths: np.ndarray) -> float:
    """Global average precision: ``(1/M) sum_i P(i) rel(i)`` over the predictions sorted by
    confidence (ties in the given order), ``M`` the queries that are not distractors."""
    shown = truths != DISTRACTOR
    if not shown.any():
        raise ValueError("GAP needs at least one query that shows an exhibit")
    order = np.argsort(-confidences, kind="stable")
    right = ((predictions == truths) & shown)[order]
    precision = np.cumsum(right) / np.arange(1, len(right) + 1)
    return float((precision * right).sum() / shown.sum())


def recognition_scores(predictions: np.ndarray, confidences: np.ndarray, truths: np.ndarray) -> dict[str, float]:
    """GAP, GAP over the non-distractor queries alone (``gap_no_distractors``, the data set's GAP-)
    and their accuracy."""
    shown = truths != DISTRACTOR
    return {"gap": gap(predictions, confidences, truths),
            "gap_no_distractors": gap(predictions[shown], confidences[shown], truths[shown]),
            "accuracy": float(np.mean(predictions[shown] == truths[shown]))}


def tuned_recognition(database: torch.Tensor, database_labels: np.ndarray, queries: dict[str, torch.Tensor],
                      query_labels: dict[str, np.ndarray], whiten: bool = False,
                      whiten_dim: int | None = None) -> dict[str, float]:
    """Test scores (:func:`recognition_scores`) of the k-NN classifier at the ``k`` and temperature
    of the best validation GAP over :data:`K_GRID` x :data:`TEMPERATURE_GRID` (the ``k`` at most the
    database's size), with them and the validation GAP. ``whiten``: every descriptor first goes
    through PCA whitening learned on the database's (:func:`learn_whitening`; ``whiten_dim``
    components, None: all the database allows; the paper's code keeps 512 of a ResNet's 2048), and
    the scores name the dimension kept (``whiten_dim``), so runs at different ones stay apart."""
    if whiten_dim is not None and not whiten:
        raise ValueError(f"whiten_dim = {whiten_dim} needs whiten=True (whitening is off)")
    kept = {}  # the whitening's dimension, among the scores when it is on
    if whiten:
        whitening = learn_whitening(database, whiten_dim)
        database, queries = whitening(database), {split: whitening(queries[split]) for split in QUERY_SPLITS}
        kept = {"whiten_dim": float(whitening.projection.shape[1])}
    num_classes = len(np.unique(database_labels))
    ks = [k for k in K_GRID if k <= len(database)] or [len(database)]
    neighbours = {}
    for split in QUERY_SPLITS:  # the largest k's neighbours alone: the Met's database holds 400k images
        ranking, similarity = rank_database(queries[split], database, ks[-1])
        neighbours[split] = similarity, database_labels[ranking]
    similarity, labels = neighbours["val"]
    tried = [(gap(*knn_recognise(similarity[:, :k], labels[:, :k], num_classes, t), query_labels["val"]), -i, k, t)
             for i, (k, t) in enumerate((k, t) for k in ks for t in TEMPERATURE_GRID)]
    val_gap, _, k, temperature = max(tried)  # the first of equal GAPs
    similarity, labels = neighbours["test"]
    scores = recognition_scores(*knn_recognise(similarity[:, :k], labels[:, :k], num_classes, temperature),
                                query_labels["test"])
    return {**scores, "val_gap": val_gap, "k": float(k), "temperature": float(temperature), **kept}


def met_recognition(backbone: nn.Module, data: MetDataset, storage: Storage, size: int,
                    amp_dtype: torch.dtype | None = None, num_workers: int = 0, whiten: bool = False,
                    whiten_dim: int | None = None) -> dict[str, float]:
    """The Met's scores (:func:`tuned_recognition`) of the backbone's CLS descriptors, every image's
    longer side at ``size`` as the other retrieval sets read theirs; ``whiten``: PCA-whitened on the
    database as the paper's baselines are (off by default, so scores stay comparable with earlier runs)."""
    described = {split: file_descriptors(backbone, storage, files, size, f"met {split} queries",
                                         amp_dtype=amp_dtype, num_workers=num_workers)
                 for split, files in data.query_files.items()}
    database = file_descriptors(backbone, storage, data.database_files, size, f"met {data.database} database",
                                amp_dtype=amp_dtype, num_workers=num_workers)
    return tuned_recognition(database, data.database_labels, described, data.query_labels, whiten, whiten_dim)
