"""The foundation model stage: user chunks, Ray Train training, versioned checkpoints."""
