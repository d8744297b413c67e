"""Dagster orchestration of the pipeline: assets, resources, jobs. No numerics here (they live in core/)."""
