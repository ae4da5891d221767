"""Kubeflow Pipelines components: one per stage, thin wrappers over the libraries."""
