"""Pure-PyTorch building blocks (no Lightning imports)."""
