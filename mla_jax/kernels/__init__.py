"""Pallas GPU kernels (tested here in interpret mode), each with an XLA path beside it."""
