"""Submit a pipeline run to a Kubeflow Pipelines endpoint.

Why: CI retraining and users without the UI start runs from a terminal. The pipeline is compiled
here and sent with the KFP client; credentials come from the caller (an env var in CI), never
from the compiled YAML.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


def submit(pipeline: Any, host: str, params: dict[str, Any], experiment: str = "dinoflow",
           namespace: str | None = None, token: str | None = None) -> str:
    """Compile ``pipeline``, create the run on ``host``; returns the KFP run id."""
    from kfp import Client, compiler

    if not host.startswith(("http://", "https://")):
        raise ValueError(f"host must be an http(s) URL of the KFP API, got {host!r}")
    client = Client(host=host, namespace=namespace, existing_token=token)
    with tempfile.TemporaryDirectory() as scratch:
        package = Path(scratch) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline, str(package))
        run = client.create_run_from_pipeline_package(str(package), arguments=params, experiment_name=experiment,
                                                      namespace=namespace)
    return str(run.run_id)
