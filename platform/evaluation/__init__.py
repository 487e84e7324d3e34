"""Metrics, transfer ratios, gain decomposition, paired tests, the report and its plots."""
