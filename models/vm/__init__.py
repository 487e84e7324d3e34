"""The VM zoo: each model self-contained; shared layers live in models/layers.py."""
