"""Numerical algorithms on plain tensors (no nn.Module here)."""
