"""Deployment assets (Dockerfiles, Kubernetes manifests, CI helpers); a package only so the CI
helper runs as ``python -m infra.ci.report_verdict`` from the repository root and tests import it."""
