"""Ray Tune: search spaces, Optuna + ASHA, W&B wiring, the trial function."""
