"""Offline evaluation: metrics, oracle and popularity comparisons, the HTML report."""
