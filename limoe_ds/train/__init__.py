"""Training on the DeepSpeed engine: the engine and one step (``engine``), the loop (``trainer``)."""
