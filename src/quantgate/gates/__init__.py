"""Noise-aware gates: paired statistics (stats), the retention gate (retention) and the regression gate
against the last accepted run (regression). See docs/gates.md for the modes, the default and the min-n rule.
"""
