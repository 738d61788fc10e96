"""Benchmarks: scripts that print measured figures (medians, ratios to a baseline in the same run)."""
