"""VM examples by point-in-time join (`loopfm features`): docs/DESIGN.md, 'Point-in-time rule'; docs/ARCHITECTURE.md.

- `join`: the rule itself, one user at a time, in numpy;
- `buckets`: key-range bucket files, the disk shuffle the stage's passes go through;
- `stage`: the Ray Data passes that apply it to every user and write the splits (imports
  Ray Train through the FM's fingerprint: import `loopfm.features.stage` where it is needed, so
  serving, which reads features, stays light);
- `reader`: the manifest, a Ray Dataset per split, and the decoder into the VM batch;
- `collate`: that decoder as an `iter_torch_batches` collate_fn (imports torch; not re-exported).
"""

from loopfm.features.join import JoinSpec, join_user
from loopfm.features.reader import FeaturesManifest, decode_batch, read_features

__all__ = [
    "FeaturesManifest", "JoinSpec", "decode_batch", "join_user", "read_features",
]
