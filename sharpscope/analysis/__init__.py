"""Pipelines: analyze (eigenpairs, trace, density, SAM alignment) and the CI gate."""
