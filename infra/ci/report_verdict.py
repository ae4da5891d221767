"""Wait for a submitted KFP run and report the promotion gate's verdict (CI retraining).

Why: ``dinoflow pipeline submit`` only starts a run; the scheduled retraining job must say whether
the new backbone was promoted. The register stage records its decision as tags of its MLflow run
(``gate.verdict``, ``gate.reason``, ``gate.model_version``), tagged with the pipeline run id, so
this script waits for the KFP run to finish, then finds that MLflow run. It reads the outside
world (argv, ``KF_PIPELINES_TOKEN``, ``MLFLOW_TRACKING_URI``, ``GITHUB_STEP_SUMMARY``) like the
CLI does; MLflow reads ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` itself.

    python -m infra.ci.report_verdict --host https://kfp.example.com/pipeline --run-id RUN_ID

Exit status: 0 when the run succeeded and the gate decided (promoted or kept), 1 when the run
did not succeed, 2 when no verdict could be found, 3 when the run was still going at ``--timeout-s``
(one ``error:`` line names the run, its last state, the wait and the run's page in the KFP UI).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from dinoflow.tracking import TAG_PIPELINE_RUN

TAG_VERDICT = "gate.verdict"
# KFP v2 run states after which nothing changes (ERROR: v1 servers); KFP's own wait_for_run_completion
# knows no CANCELED and would wait on a canceled run until its timeout
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "ERROR"})
EXIT_TIMED_OUT = 3
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dataclass(frozen=True)
class Verdict:
    """The gate's decision as the register stage tagged it."""

    verdict: str
    reason: str
    model_version: str
    mlflow_run_id: str


class RunTimeout(Exception):
    """The run had not ended when the wait gave up; it goes on in the cluster."""

    def __init__(self, run_id: str, state: str, waited_s: float) -> None:
        super().__init__(f"KFP run {run_id} still {state} after waiting {waited_s:.0f}s")
        self.run_id, self.state, self.waited_s = run_id, state, waited_s


def wait_for_run(host: str, run_id: str, timeout_s: int, namespace: str | None = None,
                 token: str | None = None, poll_s: int = 30) -> str:
    """Block until the KFP run ends; returns its final state (e.g. ``SUCCEEDED``, ``FAILED``).

    Raises RunTimeout with the last state seen when the run has not ended after ``timeout_s``.
    """
    from kfp import Client

    with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later", on every run
        warnings.filterwarnings("ignore", r"This client only works with", FutureWarning)
        client = Client(host=host, namespace=namespace, existing_token=token)
    started = time.monotonic()
    while True:
        state = str(client.get_run(run_id).state)
        if state.upper() in FINAL_STATES:
            return state
        waited = time.monotonic() - started
        if waited >= timeout_s:
            raise RunTimeout(run_id, state, waited)
        time.sleep(min(poll_s, timeout_s - waited))


def run_page(host: str, run_id: str) -> str:
    """The run's page in the KFP UI, which serves the API path ``host`` names."""
    return f"{host.rstrip('/')}/#/runs/details/{run_id}"


def find_verdict(tracking_uri: str, pipeline_run_id: str, experiment: str = "dinoflow") -> Verdict | None:
    """The register stage's decision for ``pipeline_run_id``, or None when no run recorded one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], max_results=1,
                              filter_string=f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run_id}' "
                                            f"and tags.`{TAG_VERDICT}` != ''")
    if not runs:
        return None
    tags: dict[str, Any] = runs[0].data.tags
    return Verdict(tags[TAG_VERDICT], tags.get("gate.reason", ""), tags.get("gate.model_version", ""),
                   runs[0].info.run_id)


def summary_markdown(run_id: str, state: str, verdict: Verdict | None) -> str:
    """The report, as GitHub renders a job summary."""
    lines = ["## dinoflow retraining", "", f"- KFP run: `{run_id}`, state **{state}**"]
    if verdict is None:
        lines.append("- gate: no verdict recorded")
    else:
        lines += [f"- gate: **{verdict.verdict}** (model version {verdict.model_version})",
                  f"- reason: {verdict.reason}", f"- MLflow run: `{verdict.mlflow_run_id}`"]
    return "\n".join(lines) + "\n"


def _append_summary(report: str) -> None:
    """Add ``report`` to the GitHub job summary, when running in a GitHub Actions job."""
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as handle:
            handle.write(report)


@app.command()
def main(
    host: Annotated[str, typer.Option(help="KFP API endpoint")],
    run_id: Annotated[str, typer.Option(help="the KFP run id that `dinoflow pipeline submit` printed")],
    timeout_s: Annotated[int, typer.Option(help="how long to wait for the run")] = 6 * 3600,
    poll_s: Annotated[int, typer.Option(help="seconds between status polls")] = 30,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the pipeline's runs")] = "dinoflow",
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace")] = None,
) -> None:
    """Wait for the run, print the gate's verdict (and append it to the GitHub job summary)."""
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        typer.echo("error: MLFLOW_TRACKING_URI is not set (the gate's verdict is read from MLflow)", err=True)
        raise typer.Exit(2)
    try:
        state = wait_for_run(host, run_id, timeout_s, namespace, os.environ.get("KF_PIPELINES_TOKEN"), poll_s)
    except RunTimeout as timeout:
        typer.echo(f"error: {timeout} (--timeout-s {timeout_s}); it goes on in the cluster, see "
                   f"{run_page(host, run_id)}", err=True)
        _append_summary(f"## dinoflow retraining\n\n- KFP run: `{run_id}`, timed out waiting, last state "
                        f"**{timeout.state}**: {run_page(host, run_id)}\n")
        raise typer.Exit(EXIT_TIMED_OUT) from None
    verdict = find_verdict(tracking_uri, run_id, experiment)
    report = summary_markdown(run_id, state, verdict)
    typer.echo(report)
    _append_summary(report)
    if state.upper() != "SUCCEEDED":
        raise typer.Exit(1)
    if verdict is None:
        raise typer.Exit(2)


if __name__ == "__main__":
    app()
