"""Evaluation: lm-eval against the engine, offline task definitions, and the provenance-keyed result store."""
