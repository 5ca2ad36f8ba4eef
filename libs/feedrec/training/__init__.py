"""Ray Train + TorchRec training: sharding plans, the per-worker loop, the driver."""
