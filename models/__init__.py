"""Torch modules only (no Ray): the FM, the autoencoder, the VM zoo, encoders, losses."""
