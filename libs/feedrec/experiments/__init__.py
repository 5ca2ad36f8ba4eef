"""Online experiments: simulated users of the live service and the per-variant report."""
