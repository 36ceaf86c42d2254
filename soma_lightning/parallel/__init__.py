"""Parallelism beyond data parallel: the device mesh, tensor, expert and context parallelism."""
