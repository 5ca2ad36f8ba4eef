"""Online serving: Triton Inference Server process management, model repository, clients."""
