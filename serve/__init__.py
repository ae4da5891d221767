"""Serving a backbone over HTTP: embeddings, nearest neighbours and a small web page.

Layer 4-and-a-half: it uses the science (``trainer``, ``evaluators``) and the plumbing
(``dinoflow``), and only the CLI (``pipelines/cli.py``) starts it. The pieces:

* :mod:`serve.model`: load a backbone (MLflow model URI or weight file) and embed uint8 images;
* :mod:`serve.batching`: a worker thread that merges concurrent requests into one forward pass,
  with a bounded queue and a per-request timeout;
* :mod:`serve.index`: build and load a faiss index of a folder or tar shards;
* :mod:`serve.reload`: a swappable model slot and the registry poller that picks up a new champion;
* :mod:`serve.app`: the FastAPI application (``/v1/embed``, ``/v1/neighbours``, ``/v1/classify``,
  ``/v1/pca``, ``/v1/attention``, ``/v1/pca-video``, ``/healthz``, ``/metrics``, ``/``).
"""
