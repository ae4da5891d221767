"""Helpers the CI workflows call (``.github/workflows``)."""
