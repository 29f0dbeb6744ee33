"""quantgate: a regression suite for quantized LLM checkpoints.

The path from checkpoint to verdict is: matrix -> checkpoint -> engine -> evaluation -> gates -> report.
Each step is a subpackage of plain Python; pytest (plugin.py) and the CLI (cli.py) are thin front doors.
"""

__version__ = "0.1.0"
