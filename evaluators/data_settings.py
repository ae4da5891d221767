"""How the suite's data-set settings are written, read in one place.

``seg_data``, ``depth_data`` and ``retrieval_data`` name one data set as ``<set>:<root>``
(``ade20k:s3://d/ADEChallengeData2016``), depth's transfer two as ``<set>:<root>-><set>:<root>``;
``test_sets`` and ``finegrained_data`` list roots of class folders (``finegrained_data``: or of
sets as released, :mod:`evaluators.released_sets`), comma-separated, each set named by its root's
last part.
"""

from __future__ import annotations

import re

from dinoflow.storage import basename

TRANSFER = "->"  # depth_data's "<train set>:<root>-><test set>:<root>"


def named_sets(given: str) -> list[tuple[str, str]]:
    """The ``(set, root)`` pairs a task's ``<set>:<root>`` names: one, or for depth's
    ``<set>:<root>-><set>:<root>`` (a transfer) the training and the test set; none for ``""``
    (a part without ``:`` has the root ``""``)."""
    return [(name, root) for name, _, root in (part.partition(":") for part in given.split(TRANSFER))] if given else []


def named_roots(given: str, setting: str) -> list[tuple[str, str]]:
    """``(name, root)`` of each comma-separated root of ``given`` (the value of ``setting``, named
    in the error), named by its last part (``s3://bucket/datasets/food101`` -> ``food101``): a name
    of letters, digits, ``_``, ``.`` or ``-``, used once, as it names metrics."""
    roots = [root.strip().rstrip("/") for root in given.split(",") if root.strip()]
    sets = [(basename(root), root) for root in roots]
    names = [name for name, _ in sets]
    bad = sorted({name for name in names if names.count(name) > 1 or not re.fullmatch(r"[\w.-]+", name)})
    if not sets or bad:
        raise ValueError(f"{setting} = {given!r}: give comma-separated roots of class folders, each named by its "
                         f"last part, of letters, digits, '_', '.' or '-', once (e.g. s3://d/food101,s3://d/cars); "
                         f"{'repeated or bad: ' + ', '.join(bad) if bad else 'none given'}")
    return sets
