"""The historical representation store: per-event compressed FM embeddings, versioned by FM."""
