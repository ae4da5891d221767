"""Model registry: register a version, and move the ``champion`` alias only through a gate.

Why: users pick models by alias (``models:/<name>@champion``), so the alias must move only when a
new version is measurably better. Each version carries its benchmark metrics as tags
(``metric.<name>``), so the gate compares numbers written at registration time, not whatever a
run holds later. The decision (what was compared, the numbers, the verdict) is returned for the
caller to record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

CHAMPION = "champion"
METRIC_TAG = "metric."


@dataclass(frozen=True)
class GateDecision:
    """Outcome of :func:`gate`; ``promoted`` says whether the alias now points at ``version``."""

    model: str
    version: str
    metric: str
    value: float
    margin: float
    champion_version: str | None
    champion_value: float | None
    promoted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def register_version(client: Any, name: str, run_id: str, artifact_path: str,
                     metrics: dict[str, float], description: str = "") -> str:
    """A new version of registered model ``name`` (created if missing) from a run's model folder,
    tagged with ``metrics``; returns the version number as a string."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, description=description or None,
        tags={f"{METRIC_TAG}{key}": repr(float(value)) for key, value in metrics.items()},
    )
    return str(version.version)


def version_metric(client: Any, name: str, version: str, metric: str) -> float | None:
    """The metric a version was registered with, or None when it has none."""
    tags = client.get_model_version(name, version).tags
    text = tags.get(f"{METRIC_TAG}{metric}")
    return None if text is None else float(text)


def champion_version(client: Any, name: str, alias: str = CHAMPION) -> str | None:
    """The version the ``champion`` alias (or another ``alias``) points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """``models:/<name>@<alias>`` -> ``(name, alias, None)``, ``models:/<name>/<version>`` ->
    ``(name, None, version)``; None for any other URI."""
    if not uri.startswith("models:/"):
        return None
    path = uri[len("models:/"):]
    if "@" in path:
        name, alias = path.rsplit("@", 1)
        return name, alias, None
    name, _, version = path.rpartition("/")
    return (name, None, version) if name and version.isdigit() else None


def gate(client: Any, name: str, version: str, metric: str, margin: float = 0.0) -> GateDecision:
    """Point ``champion`` at ``version`` if its ``metric`` beats the champion's by more than
    ``margin`` (higher is better), or if there is no champion (or it lacks the metric).

    Raises ``ValueError`` when ``version`` itself has no finite value for ``metric``.
    """
    value = version_metric(client, name, version, metric)
    if value is None or not math.isfinite(value):
        raise ValueError(f"model {name!r} version {version} has no finite {metric!r} to gate on "
                         f"(tags: {sorted(client.get_model_version(name, version).tags)})")
    current = champion_version(client, name)
    current_value = None if current is None else version_metric(client, name, current, metric)
    if current is None:
        promoted, reason = True, "no champion yet"
    elif current_value is None:
        promoted, reason = True, f"champion v{current} has no {metric}"
    elif value > current_value + margin:
        promoted, reason = True, f"{value:.4f} > {current_value:.4f} + margin {margin:g}"
    else:
        promoted, reason = False, f"{value:.4f} <= {current_value:.4f} + margin {margin:g}"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    return GateDecision(name, version, metric, value, margin, current, current_value, promoted, reason)
