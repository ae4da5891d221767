"""Wait for a submitted KFP run and report the promotion gate's verdict (CI retraining).

Why: ``dinoflow pipeline submit`` only starts a run; the scheduled retraining job must say whether
the new backbone was promoted. The register stage records its decision as tags of its MLflow run
(``gate.verdict``, ``gate.reason``, ``gate.model_version``), tagged with the pipeline run id, so
this script waits for the KFP run to finish, then finds that MLflow run. It reads the outside
world (argv, ``KF_PIPELINES_TOKEN``, ``MLFLOW_TRACKING_URI``, ``GITHUB_STEP_SUMMARY``) like the
CLI does; MLflow reads ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` itself.

    python -m infra.ci.report_verdict --host https://kfp.example.com/pipeline --run-id RUN_ID

Exit status: 0 when the run succeeded and the gate decided (promoted or kept), 1 when the run
did not succeed, 2 when no verdict could be found, also when the KFP API could not be read (one
``error:`` line names the host, the run and the HTTP status or connection error: an unknown run id
is 404, a refused token 401 or 403), 3 when the run was still going at ``--timeout-s`` (one
``error:`` line names the run, its last state, the wait and the run's page in the KFP UI). Both
``error:`` lines also go to the GitHub job summary.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dinoflow.tracking import TAG_PIPELINE_RUN

if TYPE_CHECKING:
    from kfp import Client

TAG_VERDICT = "gate.verdict"
# KFP v2 run states after which nothing changes (ERROR: v1 servers); KFP's own wait_for_run_completion
# knows no CANCELED and would wait on a canceled run until its timeout
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "ERROR"})
EXIT_NO_VERDICT = 2
EXIT_TIMED_OUT = 3
# what an HTTP status of the KFP API most likely means here
HTTP_HINTS = {401: "KF_PIPELINES_TOKEN was refused", 403: "KF_PIPELINES_TOKEN may not read this run",
              404: "no such run, or --host is not the KFP API endpoint"}
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


class KfpApiError(Exception):
    """The KFP API could not be read: an HTTP error status, or no connection at all."""

    def __init__(self, host: str, run_id: str, what: str) -> None:
        what = " ".join(what.split())  # one line: an SSL error's reason spans two
        super().__init__(f"cannot read KFP run {run_id} from {host}: {what}")
        self.host, self.run_id, self.what = host, run_id, what


@contextmanager
def kfp_api_errors(host: str, run_id: str) -> Iterator[None]:
    """Turn the KFP client's HTTP and connection errors into a :class:`KfpApiError`.

    Why: they reach the job log as a traceback (``ApiException``'s text spans the response headers
    and body) and exit 1, the status of a run that did not succeed.
    """
    from kfp_server_api import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as err:
        status = f"HTTP {err.status} {err.reason}" if err.status else str(err.reason)  # status 0: an SSL error
        hint = HTTP_HINTS.get(err.status or 0)
        raise KfpApiError(host, run_id, f"{status} ({hint})" if hint else status) from None
    except HTTPError as err:  # MaxRetryError: connection refused, unknown host, timeouts
        raise KfpApiError(host, run_id, f"no connection: {getattr(err, 'reason', None) or err}") from None


def kfp_client(host: str, namespace: str | None, token: str | None) -> Client:
    """A KFP client whose constructor asks the API's health once.

    Why once: ``Client`` asks it (to find a multi-user namespace) up to 5 times, 5 s apart, logging
    a traceback each time, also for errors no retry mends (a refused token); the wait's polls
    after its first go on through transient errors (:func:`wait_for_run`).
    """
    from kfp import Client

    class OneHealthCheckClient(Client):
        def get_kfp_healthz(self, sleep_duration: int = 5) -> Any:
            return self._healthz_api.healthz_service_get_healthz()

    with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later", on every run
        warnings.filterwarnings("ignore", r"This client only works with", FutureWarning)
        return OneHealthCheckClient(host=host, namespace=namespace, existing_token=token)


def wait_for_run(host: str, run_id: str, timeout_s: int, namespace: str | None = None,
                 token: str | None = None, poll_s: int = 30) -> str:
    """Block until the KFP run ends; returns its final state (e.g. ``SUCCEEDED``, ``FAILED``).

    Raises RunTimeout with the last state seen when the run has not ended after ``timeout_s``, and
    KfpApiError when the API answers with an error status or cannot be reached: at once on the
    first read (a wrong host, run id or token), later only for what no retry mends (:func:`transient`
    errors, an API server restarting during an hours-long wait, are polled through until the deadline).
    """
    with kfp_api_errors(host, run_id):
        client = kfp_client(host, namespace, token)
        started = time.monotonic()
        state = str(client.get_run(run_id).state)
        while state.upper() not in FINAL_STATES:
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise RunTimeout(run_id, state, waited)
            time.sleep(min(poll_s, timeout_s - waited))
            try:
                state = str(client.get_run(run_id).state)
            except Exception as err:
                if not transient(err):
                    raise  # (said by kfp_api_errors)
        return state


def transient(err: BaseException) -> bool:
    """A KFP API error that a later poll may not meet: an HTTP 429 or 5xx answer, or no connection."""
    from kfp_server_api import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(err, ApiException):
        return err.status == 429 or (err.status or 0) >= 500
    return isinstance(err, HTTPError)


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
        raise typer.Exit(EXIT_NO_VERDICT)
    try:
        state = wait_for_run(host, run_id, timeout_s, namespace, os.environ.get("KF_PIPELINES_TOKEN"), poll_s)
    except RunTimeout as timeout:
        typer.echo(f"error: {timeout} (--timeout-s {timeout_s}); it goes on in the cluster, see "
                   f"{run_page(host, run_id)}", err=True)
        _append_summary(f"## dinoflow retraining\n\n- KFP run: `{run_id}`, timed out waiting, last state "
                        f"**{timeout.state}**: {run_page(host, run_id)}\n")
        raise typer.Exit(EXIT_TIMED_OUT) from None
    except KfpApiError as error:
        typer.echo(f"error: {error}", err=True)
        _append_summary(f"## dinoflow retraining\n\n- KFP run: `{run_id}`, not read from {host}: {error.what}\n")
        raise typer.Exit(EXIT_NO_VERDICT) from None
    verdict = find_verdict(tracking_uri, run_id, experiment)
    report = summary_markdown(run_id, state, verdict)
    typer.echo(report)
    _append_summary(report)
    if state.upper() != "SUCCEEDED":
        raise typer.Exit(1)
    if verdict is None:
        raise typer.Exit(EXIT_NO_VERDICT)


if __name__ == "__main__":
    app()
