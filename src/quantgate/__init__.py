"""quantgate: a regression suite for quantized LLM checkpoints.

The path from checkpoint to verdict is: matrix -> checkpoint -> engine -> evaluation -> gates -> report.
Each step is a subpackage of plain Python; pytest (plugin.py) and the CLI (cli.py) are thin front doors.

PYTEST_DONT_REWRITE: pytest marks the package of a pytest11 plugin for assertion rewriting and warns
(PytestAssertRewriteWarning) when the package is already imported, which it always is under `quantgate run`
(the CLI is part of it). This file has no assert to rewrite; the marker keeps the rewriting of every submodule
(quantgate.suite's tests among them) and stops the warning.
"""

__version__ = "0.1.0"
