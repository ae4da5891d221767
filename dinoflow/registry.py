"""Model registry: register a version, and move the ``champion`` alias only through a gate.

Why: users pick models by alias (``models:/<name>@champion``), so the alias must move only when a
new version is measurably better. Each version carries its benchmark metrics as tags
(``metric.<name>``), so the gate compares numbers written at registration time, not whatever a
run holds later. The decision (what was compared, the numbers, the verdict) is returned for the
caller to record.

A person may still move an alias past the gate (:func:`move_alias`: a rollback after a version
misbehaves in use, a promotion on grounds the gate does not measure). Every move, the gate's and a
person's, is written on the version it lands on (``alias.<alias>``: when, who, why), so "why is
this version the champion?" has an answer in the registry itself (:func:`model_versions`).

A version registered with the DINO/iBOT heads trained beside its backbone is tagged ``heads`` (their
path in its run): :func:`download_version` fetches them with the backbone, so a retrain or a
distillation from the version starts from them.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dinoflow.run_files import BACKBONE_FILE, HEADS_FILE

CHAMPION = "champion"
METRIC_TAG = "metric."
ALIAS_TAG = "alias."  # alias.<alias> on a version: when and why that alias last moved to it
HEADS_TAG = "heads"  # on a version: where in its run the heads trained with the backbone are
# the ends of the names of the metrics that measure an error, where smaller is better (depth_rmse,
# depth_abs_rel, corruption_<set>_mce, corruption_<set>_error); every other metric is a score
ERROR_METRICS = ("rmse", "abs_rel", "mce", "error")


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


# the registry's answers about what was asked: no such model or version, no such alias, a name it refuses
ANSWER_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def answered(err: Exception) -> bool:
    """Whether ``err`` (an ``MlflowException``) is the registry's answer (:data:`ANSWER_CODES`), not
    its store failing (unreachable, timed out, a 5xx). Why: a caller turns an answer into its own
    message or default ("no champion yet"), but a store that did not answer must not read as one:
    the gate would crown a new version, a command would say a model has no champion. Failures go
    through (one line, exit status 1, in the CLI)."""
    return getattr(err, "error_code", None) in ANSWER_CODES


def registry_store(tracking_uri: str = "") -> str:
    """The MLflow store every ``models:/`` and ``runs:/`` URI of dinoflow is resolved in:
    ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the demo's (``sqlite:///runs/demo/mlflow.db``).

    Why one function: each command used to pick its own (MLflow's default opened an empty
    ``./mlflow.db`` and missed the model the demo registered). The demo's store must exist: opening
    a sqlite store that is not there would make an empty one."""
    from dinoflow.config import DemoConfig
    from dinoflow.tracking import default_tracking_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    demo = Path(DemoConfig().out)
    if not (demo / "mlflow.db").is_file():
        raise ValueError(f"no MLflow store given and the demo's (sqlite:///{demo.resolve() / 'mlflow.db'}) is not "
                         "there yet: run `make demo`, or give --tracking-uri or MLFLOW_TRACKING_URI")
    return default_tracking_uri(demo)


def registry_client(tracking_uri: str = "") -> Any:
    """An MLflow client whose tracking and registry are :func:`registry_store`'s."""
    from mlflow.tracking import MlflowClient

    uri = registry_store(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_version(client: Any, name: str, run_id: str, artifact_path: str,
                     metrics: dict[str, float], description: str = "", heads: str = "") -> str:
    """A new version of registered model ``name`` (created if missing) from a run's model folder,
    tagged with ``metrics`` and, when given, ``heads`` (the run's artifact path of the DINO/iBOT heads
    trained with the backbone, tag ``heads``: a retrain or a distillation starts from them);
    returns the version number as a string."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not answered(err):
            raise
        client.create_registered_model(name)
    version = client.create_model_version(
        name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, description=description or None,
        tags={**{f"{METRIC_TAG}{key}": repr(float(value)) for key, value in metrics.items()},
              **({HEADS_TAG: heads} if heads else {})},
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
    except MlflowException as err:
        if not answered(err):
            raise
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


def pick_version(client: Any, model: str) -> Any:
    """The registered version ``model`` names: ``<name>`` (its ``champion``), ``<name>@<alias>``,
    ``<name>/<version>``, or any of them as a ``models:/`` URI; fails naming what is missing."""
    from mlflow.exceptions import MlflowException

    path = model.removeprefix("models:/")
    name, alias, version = parse_registry_uri(f"models:/{path}") or (path, CHAMPION, None)
    if version is None:
        version = champion_version(client, name, alias)  # (an alias whenever no version is named)
        if version is None:
            raise ValueError(f"registered model {name!r} has no champion: run the full pipeline first"
                             if alias == CHAMPION else f"registered model {name!r} has no alias {alias!r}")
    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if not answered(err):
            raise
        raise ValueError(f"registered model {name!r}: {' '.join(err.message.split())}") from None


def download_version(client: Any, found: Any, backbone_artifact: str, out: Path) -> None:
    """A registered version's backbone (``backbone_artifact``, a path in its run) into ``out`` as
    ``backbone.safetensors`` and, when registered with them, its heads as ``heads.safetensors``:
    the folder a retrain or a distillation starts from. Through ``client``'s store (a ``models:/``
    URI would resolve against the global registry URI)."""
    out.mkdir(parents=True, exist_ok=True)
    wanted = {BACKBONE_FILE: backbone_artifact, HEADS_FILE: (found.tags or {}).get(HEADS_TAG, "")}
    with tempfile.TemporaryDirectory() as scratch:
        for name, artifact in wanted.items():
            if artifact:
                shutil.copyfile(client.download_artifacts(found.run_id, artifact, scratch), out / name)


def pinned_uri(client: Any, uri: str) -> str:
    """``uri`` with the version it names now: ``models:/<name>@<alias>`` and ``models:/<name>`` (its
    champion) as ``models:/<name>/<version>``; a version's URI as it is, any other URI untouched.
    Why: processes that each resolve an alias (a command's ranks) find different versions when it
    moves between their lookups; resolved once and handed on, the version is the same for all."""
    if not uri.startswith("models:/"):
        return uri
    found = pick_version(client, uri)
    return f"models:/{found.name}/{found.version}"


@dataclass(frozen=True)
class CachedVersion:
    """Where :func:`cached_version` keeps a registered version, and whether this call downloaded it
    (else a whole copy was there)."""

    folder: Path
    downloaded: bool


def cached_version(client: Any, store: str, found: Any, backbone_artifact: str, cache: Path) -> CachedVersion:
    """The registered version ``found`` of ``client``'s store ``store`` as :func:`download_version`
    lays it out, in its folder of ``cache``: ``registered/<the store URI's hash>/<name>/<version>-<run
    id>``, downloaded unless a whole copy is there.

    Why one fixed folder: a run records it in its config, so the same command rerun resumes (a
    fine-tuning refuses other weights), and a machine's ranks fetch it once. The run id is in its
    name because a store numbers versions anew when a model is deleted and registered again: the new
    version 1 must not be read from the old one's folder. Under a file lock, so processes download
    it once; into a sibling ``.<folder>.partial`` renamed when whole, so a download killed half-way
    leaves no folder that could be reused (its sibling is replaced by the next fetch). Raises the
    ``OSError`` of a cache that cannot be made, locked or written, for the caller to name it."""
    from filelock import FileLock

    if not found.run_id:  # its run names its folder, and its weights are that run's artifacts
        raise ValueError(f"registered model {found.name!r} version {found.version} has no run to fetch it from "
                         f"(its source: {found.source}); register it from a run")
    folder = (cache / "registered" / hashlib.sha256(store.encode()).hexdigest()[:12]
              / urllib.parse.quote(found.name, safe="") / f"{found.version}-{found.run_id}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_name(f".{folder.name}.lock")):
        if (folder / BACKBONE_FILE).is_file():
            return CachedVersion(folder, downloaded=False)
        partial = folder.with_name(f".{folder.name}.partial")
        for stale in (partial, folder):  # a killed download's, or a folder emptied by hand
            shutil.rmtree(stale, ignore_errors=True)
        download_version(client, found, backbone_artifact, partial)
        partial.rename(folder)
    return CachedVersion(folder, downloaded=True)


def lower_is_better(metric: str) -> bool:
    """Whether a smaller ``metric`` is the better one: an error (its name ``<name>`` or ending in
    ``_<name>``, a name of :data:`ERROR_METRICS`), not a score (accuracy, mIoU, mAP, delta1, the
    signed ``paper_gap_*``). Read from the name, so the gate is right for every metric the suite
    reports with no parameter to set."""
    return any(metric == name or metric.endswith(f"_{name}") for name in ERROR_METRICS)


def gate(client: Any, name: str, version: str, metric: str, margin: float = 0.0) -> GateDecision:
    """Point ``champion`` at ``version`` if its ``metric`` beats the champion's by more than
    ``margin`` (higher is better; lower for an error, :func:`lower_is_better`), or if there is no
    champion (or it lacks the metric).

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
    elif lower_is_better(metric):
        promoted = value < current_value - margin
        reason = f"{value:.4f} {'<' if promoted else '>='} {current_value:.4f} - margin {margin:g} (lower is better)"
    else:
        promoted = value > current_value + margin
        reason = f"{value:.4f} {'>' if promoted else '<='} {current_value:.4f} + margin {margin:g}"
    if promoted:
        _set_alias(client, name, version, CHAMPION, f"gate: {reason}")
    return GateDecision(name, version, metric, value, margin, current, current_value, promoted, reason)


@dataclass(frozen=True)
class VersionRow:
    """One registered version as ``dinoflow models list`` shows it."""

    name: str
    version: str
    aliases: tuple[str, ...]
    metrics: dict[str, float]
    registered: str  # UTC, ISO 8601 to the second
    run_id: str
    description: str
    alias_moves: dict[str, str] = field(default_factory=dict)  # alias -> "<UTC time> <who>: <why>"
    heads: str = ""  # the run's artifact path of the heads registered with the backbone ("": none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_versions(client: Any, name: str | None = None) -> list[VersionRow]:
    """Every version of registered model ``name`` (of every registered model when None), newest
    first, with the aliases pointing at it and the metrics it was registered with."""
    names = [name] if name else sorted(model.name for model in client.search_registered_models())
    rows = []
    for model_name in names:
        aliases = _registered_model(client, model_name).aliases  # {alias: version}
        for found in client.search_model_versions(f"name='{model_name}'"):
            version = str(found.version)
            tags = found.tags or {}
            rows.append(VersionRow(
                name=model_name, version=version,
                aliases=tuple(sorted(alias for alias, target in aliases.items() if str(target) == version)),
                metrics={key[len(METRIC_TAG):]: float(value) for key, value in sorted(tags.items())
                         if key.startswith(METRIC_TAG)},
                registered=_utc(found.creation_timestamp / 1000), run_id=found.run_id or "",
                description=found.description or "",
                alias_moves={key[len(ALIAS_TAG):]: value for key, value in sorted(tags.items())
                             if key.startswith(ALIAS_TAG)}, heads=tags.get(HEADS_TAG, "")))
    return sorted(rows, key=lambda row: (row.name, -int(row.version)))


def move_alias(client: Any, name: str, version: str, alias: str = CHAMPION, reason: str = "") -> str | None:
    """Point ``alias`` at ``version`` by hand (a rollback, or a promotion the gate would not make),
    past the gate, recording when and why on the version; returns the version it pointed at before."""
    from mlflow.exceptions import MlflowException

    _registered_model(client, name)
    try:
        client.get_model_version(name, version)
    except MlflowException as err:
        if not answered(err):
            raise
        known = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise ValueError(f"model {name!r} has no version {version!r}; its versions: "
                         f"{', '.join(map(str, known)) or '(none)'}") from None
    before = champion_version(client, name, alias)
    try:
        _set_alias(client, name, version, alias, f"by hand: {reason or '(no reason given)'}")
    except MlflowException as err:  # e.g. a reserved alias: "latest", "v<number>"
        if not answered(err):
            raise
        raise ValueError(f"alias {alias!r}: {err.message}") from None
    return before


def _set_alias(client: Any, name: str, version: str, alias: str, why: str) -> None:
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, f"{ALIAS_TAG}{alias}", f"{_utc()} {why}")


def _registered_model(client: Any, name: str) -> Any:
    """The registered model ``name``; a miss names the models the registry holds."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if not answered(err):
            raise
        held = sorted(model.name for model in client.search_registered_models())
        raise ValueError(f"no registered model {name!r}; the registry holds: {', '.join(held) or '(none)'}") from None


def _utc(seconds: float | None = None) -> str:
    moment = datetime.now(timezone.utc) if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
