"""Wait for a submitted KFP run and report the promotion gate's verdict (CI retraining).

Why: ``dinoflow pipeline submit`` only starts a run; the scheduled retraining job must say whether
the new backbone was promoted. The register stage records its decision as tags of its MLflow run
(``gate.verdict``, ``gate.reason``, ``gate.model_version``), tagged with the pipeline run id, so
this script waits for the KFP run to finish, then finds that MLflow run. It reads the outside
world (argv, ``KF_PIPELINES_TOKEN``, ``MLFLOW_TRACKING_URI``, ``GITHUB_STEP_SUMMARY``) like the
CLI does; MLflow reads ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` itself.

    python -m infra.ci.report_verdict --host https://kfp.example.com/pipeline --run-id RUN_ID

Exit status: 0 when the run succeeded and the gate decided (promoted or kept), 1 when the run
did not succeed, 2 when no verdict could be found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from dinoflow.tracking import TAG_PIPELINE_RUN

TAG_VERDICT = "gate.verdict"
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dataclass(frozen=True)
class Verdict:
    """The gate's decision as the register stage tagged it."""

    verdict: str
    reason: str
    model_version: str
    mlflow_run_id: str


def wait_for_run(host: str, run_id: str, timeout_s: int, namespace: str | None = None,
                 token: str | None = None, poll_s: int = 30) -> str:
    """Block until the KFP run ends; returns its final state (e.g. ``SUCCEEDED``, ``FAILED``)."""
    from kfp import Client

    client = Client(host=host, namespace=namespace, existing_token=token)
    run = client.wait_for_run_completion(run_id, timeout=timeout_s, sleep_duration=poll_s)
    return str(run.state)


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
    state = wait_for_run(host, run_id, timeout_s, namespace, os.environ.get("KF_PIPELINES_TOKEN"), poll_s)
    verdict = find_verdict(tracking_uri, run_id, experiment)
    report = summary_markdown(run_id, state, verdict)
    typer.echo(report)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as handle:
            handle.write(report)
    if state.upper() != "SUCCEEDED":
        raise typer.Exit(1)
    if verdict is None:
        raise typer.Exit(2)


if __name__ == "__main__":
    app()
