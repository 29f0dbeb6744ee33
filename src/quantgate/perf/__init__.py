"""Serving performance, memory and size budgets for each variant (`pytest -m perf`).

`serve_bench` measures (vLLM's own `vllm bench serve` against the suite's server), `budgets` holds the
schema of thresholds/perf.yaml and the pure verdict logic. Nothing is imported here eagerly, so that
`python -m quantgate.perf.serve_bench` runs that module exactly once.
"""
