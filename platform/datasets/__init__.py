"""Event logs in: the synthetic generator, readers for real logs, validation and the time split."""
