"""Ray Serve deployments and the app builder used by `serve run` / `serve deploy`."""
