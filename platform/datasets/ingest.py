"""`loopfm data validate`: read the configured log, check the contract, write normalized events.

(First cut: synthetic source only, no rules yet. The readers and validation rules replace it.)
"""

from __future__ import annotations

from loopfm.config import LoopFMConfig, stable_hash
from loopfm.datasets.schema import EVENT_SCHEMA
from loopfm.errors import MissingInputError
from loopfm.rundir import RunDir, atomic_output, is_complete, read_manifest, write_manifest


def validate_stage(cfg: LoopFMConfig, run: RunDir, args=None) -> dict:
    import ray

    from loopfm.runtime import init_ray, log

    source = read_manifest(run.source)
    if source is None:
        raise MissingInputError(f"no log in {run.source}: run `loopfm data generate` first")
    fingerprint = stable_hash(source["fingerprint"], cfg.data.validation)
    if is_complete(run.events, fingerprint):
        log.info("data validate: %s is current, skipped", run.events)
        return read_manifest(run.events)
    init_ray(cfg.ray)
    categorical = list(source.get("categorical", []))
    ds = ray.data.read_parquet(str(run.source))
    with atomic_output(run.events) as tmp:
        ds.write_parquet(str(tmp))
        manifest = {
            "fingerprint": fingerprint,
            "rows": ds.count(),
            "categorical": categorical,
            "columns": [*EVENT_SCHEMA.names, *categorical],
        }
        write_manifest(tmp, manifest)
    log.info("data validate: %d events -> %s", manifest["rows"], run.events)
    return manifest
