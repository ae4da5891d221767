"""Pipelines (DAGs of components), the demo job and the ``dinoflow`` command line."""
