"""Experiments built on uda_tf (label efficiency)."""
