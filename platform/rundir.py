"""The run directory (docs/DESIGN.md, 'Run directory and stage outputs'): where every stage reads its inputs and
writes its outputs.

Each stage output is a directory holding a `manifest.json` with the stage's fingerprint (a hash of
the config sections and upstream versions it depends on). A stage whose output exists with the same
fingerprint is skipped. Outputs are written to a hidden temp directory and renamed into place, so a
crashed job leaves no half-written output under the final name.

Writers of one output take its lock (`filelock`, see `output_lock`) for the whole write, so two
processes never interleave; a temp directory's name says its owner (host, pid and the pid's start
time), so a writer reaps only the leftovers of dead processes, never a live writer's. Replacing
an existing output is one atomic exchange of the two directories (`renameat2(RENAME_EXCHANGE)`):
a reader sees the old output or the new one, never none.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar

from filelock import FileLock

from loopfm.errors import MissingInputError, RowCountError, UnsupportedLocationError, VersionMismatchError
from loopfm.location import AnyPath, UriPath, as_location, as_path, is_remote

MANIFEST = "manifest.json"
LOCK_DIR = Path(tempfile.gettempdir()) / "loopfm-locks"
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100
_TMP_NAME = re.compile(r"\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}$")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # one path component, never "." / ".." / hidden


def valid_id(value: object, what: str) -> str:
    """`value` when it is a safe id (hex, slug), else a refusal naming `what`.

    Versions, fingerprints and arms are read from manifests (a VM's `store_version`, a feature
    set's fingerprint) and joined into paths; a manifest that says `../../elsewhere` must not
    send a reader (or a writer) out of the run directory.
    """
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise VersionMismatchError(f"{what} {value!r} is not an id (letters, digits, '_', '-', '.'; "
                                   f"at most 128; not starting with '.'): refused as a path")
    return value


def local_path(location: str | os.PathLike) -> Path:
    """The local path a run directory names (a plain path or a `file://` URI); a remote URI is refused."""
    where = as_location(location)
    if isinstance(where, UriPath):
        raise UnsupportedLocationError(f"{str(where)!r} is not a local path (file:///abs/path)")
    return where


class RunDir:
    """Paths of one run; every stage takes one, so names live here and nowhere else."""

    def __init__(self, root: str | os.PathLike | UriPath):
        self.root: AnyPath = as_location(root).resolve()

    @property
    def remote(self) -> bool:
        """Whether the run lives on an object store (outputs commit by manifest, not by rename)."""
        return is_remote(self.root)

    # -- layout ------------------------------------------------------------------------------
    @property
    def config_path(self) -> AnyPath:
        return self.root / "config.yaml"

    @property
    def source(self) -> AnyPath:
        """The synthetic generator's raw log (contract format, before validation)."""
        return self.root / "data" / "source"

    @property
    def events(self) -> AnyPath:
        """Validated, normalized events (one row per impression)."""
        return self.root / "data" / "events"

    @property
    def appended(self) -> AnyPath:
        """Batches of new events added after the split (`loopfm logs append`), one folder each."""
        return self.root / "data" / "appended"

    @property
    def splits(self) -> AnyPath:
        """train/ valid/ test/ parquet folders, the vocabulary and `manifest.json`."""
        return self.root / "data" / "splits"

    # Every id below may come from a manifest: each is checked before it becomes a path (valid_id).
    def fm(self, fingerprint: str) -> AnyPath:
        return self.root / "fm" / valid_id(fingerprint, "FM fingerprint")

    def store(self, version: str) -> AnyPath:
        return self.root / "store" / valid_id(version, "store version")

    def store_deltas(self, version: str) -> AnyPath:
        """Deltas of store `version` (`loopfm embed --incremental`), one folder each, in order."""
        return self.root / "store_deltas" / valid_id(version, "store version")

    def features(self, fingerprint: str) -> AnyPath:
        return self.root / "features" / valid_id(fingerprint, "features fingerprint")

    def vm(self, arm: str, seed: int, fingerprint: str) -> AnyPath:
        seed = int(seed)
        return self.root / "vm" / valid_id(arm, "arm") / f"seed{seed}-{valid_id(fingerprint, 'VM fingerprint')}"

    @property
    def tune(self) -> AnyPath:
        return self.root / "tune"

    @property
    def report(self) -> AnyPath:
        return self.root / "report"

    @property
    def ray_storage(self) -> AnyPath:
        """Ray Train / Tune `storage_path`: checkpoints of in-flight runs, for resume."""
        return self.root / "ray"

    def ensure(self) -> RunDir:
        self.root.mkdir(parents=True, exist_ok=True)
        return self


# -- single files and manifests ----------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(final: AnyPath) -> Iterator[Path]:
    """Yield a hidden temp path beside `final`; once the block has written it, it is renamed to
    `final`; on error it is removed. Every single file the stages write (manifests, reports, plots,
    tune tables) goes through here: a reader sees the old file or the new one, never half of one.
    On an object store the temp file is local and goes up in one PUT, which is all or nothing."""
    if is_remote(final):
        with tempfile.TemporaryDirectory(prefix="loopfm-put-") as folder:
            tmp = Path(folder) / final.name
            yield tmp
            final.write_bytes(tmp.read_bytes())
        return
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: AnyPath, data: bytes) -> AnyPath:
    """`data` as the whole content of `path`, written atomically (`atomic_file`)."""
    if is_remote(path):
        path.write_bytes(data)  # one PUT
        return path
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: AnyPath, text: str) -> AnyPath:
    """`text` (UTF-8) as the whole content of `path`, written atomically (`atomic_file`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def now_stamp() -> str:
    """A manifest's `created_at`: local time with its UTC offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def manifest_json(data: dict[str, Any]) -> str:
    """The text of every `manifest.json`: sorted keys, two-space indent, anything else as str."""
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def read_manifest(path: AnyPath) -> Optional[dict]:
    """The manifest of output directory `path` as a dict; None when it has none (not finished)."""
    f = as_path(path) / MANIFEST
    if not f.is_file():
        return None
    return json.loads(f.read_text())


def write_manifest(path: AnyPath, manifest: dict[str, Any], stamp: bool = True) -> None:
    """`path/manifest.json`, atomically. `stamp` adds `created_at` (a `created_at` in `manifest` wins)."""
    data = {"created_at": now_stamp(), **manifest} if stamp else dict(manifest)
    atomic_write_text(as_path(path) / MANIFEST, manifest_json(data))


REQUIRED = "loopfm_required"  # field metadata: required in a manifest read back, though it has a default
M = TypeVar("M", bound="Manifest")


def computed(default: Any) -> Any:
    """A manifest field its writer computes (`seal`: the row count and ts range): callers building
    the manifest leave it out, and a manifest read back without it is refused like any other."""
    return dataclasses.field(default=default, metadata={REQUIRED: True})


@dataclasses.dataclass
class Manifest:
    """Base of the manifest dataclasses (store, FM, VM, feature set, splits): one `manifest.json` in
    an output directory, read with every required field checked and written atomically.

    A subclass is a dataclass of its fields plus `MISSING`, the error when the directory holds no
    manifest (it names the stage to run), and `STAMP`, whether `write` adds `created_at`.
    """

    MISSING: ClassVar[str] = "no output at {path} (missing manifest.json)"
    STAMP: ClassVar[bool] = False

    @classmethod
    def read(cls: type[M], path: Path) -> M:
        raw = read_manifest(path)
        if raw is None:
            raise MissingInputError(cls.MISSING.format(path=path))
        return cls.from_dict(raw, path)

    @classmethod
    def from_dict(cls: type[M], raw: dict[str, Any], path: Path | str = "") -> M:
        """The manifest from its JSON; one lacking a required field is refused by name, keys that
        are not fields (`created_at` of a stamped one, fields of a newer version) are ignored."""
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in raw and (
            f.metadata.get(REQUIRED)
            or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING))]
        if missing:
            raise VersionMismatchError(f"{path}/{MANIFEST} lacks {missing}: not a complete {cls.__name__}")
        return cls(**{f.name: raw[f.name] for f in fields if f.name in raw})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, directory: Path) -> None:
        """`directory/manifest.json`, atomically (inside `atomic_output`, the last file written)."""
        write_manifest(directory, self.to_dict(), stamp=self.STAMP)


def check_rows(stage: str, where: Path | str, got: int, expected: int, what: str) -> None:
    """Refuse to publish an output whose row count is not the one its stage knows it must be.

    Called inside `atomic_output`, before the manifest: a stage that lost or doubled rows raises
    here, and the temp dir is removed, so no reader ever sees the short output under its name.
    """
    if got != expected:
        raise RowCountError(f"{stage}: {where} holds {got} rows, expected {expected} ({what}); not published")


def is_complete(path: Path, fingerprint: Optional[str] = None) -> bool:
    """True when `path` holds a finished output (and, if given, with this fingerprint)."""
    m = read_manifest(path)
    return m is not None and (fingerprint is None or m.get("fingerprint") == fingerprint)


def _process_start(pid: int) -> Optional[str]:
    """The start time of `pid` (clock ticks since boot, /proc), or None when no such process runs
    (a zombie, killed but not yet waited for, has ended).

    With the pid it names one process: a pid reused after its owner died has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields 3.. of proc(5), after the command name
    return None if fields[0] in "ZX" else fields[19]  # a zombie has ended; [19] is field 22, starttime


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_name(final: Path) -> str:
    """`.<name>.tmp-<host>-<pid>-<start>-<random>`: the owner is in the name, so the output holds no
    bookkeeping file and a dead owner's leftover can be told from a live writer's."""
    return f".{final.name}.tmp-{_host()}-{os.getpid()}-{_process_start(os.getpid()) or 0}-{uuid.uuid4().hex[:8]}"


def _owned_by_live_process(tmp: Path) -> bool:
    """Whether the writer that made temp dir `tmp` still runs (then it must not be touched)."""
    match = _TMP_NAME.search(tmp.name)
    if match is None:
        return False  # a name from before owners were recorded: its writer is long gone
    if match["host"] != _host():
        return True  # another machine's process: its liveness cannot be seen from here
    return _process_start(int(match["pid"])) == match["start"]


def reap_stale(final: Path) -> list[Path]:
    """Remove temp dirs of `final` whose writer is dead and `.old-*` dirs a crash left; returns them."""
    final = Path(final)
    reaped = []
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        if stale.is_dir() and not _owned_by_live_process(stale):
            shutil.rmtree(stale, ignore_errors=True)
            reaped.append(stale)
    for old in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(old, ignore_errors=True)
        reaped.append(old)
    return reaped


def reap_dead_temps(parent: Path) -> list[Path]:
    """Remove every temp dir in `parent` whose writer is dead, whatever output it was for; returns them.

    For a directory of outputs whose names change from write to write (store deltas: a re-run
    after a kill gets another name, so `reap_stale` of the new name never sees the old temp dir).
    """
    reaped = []
    for stale in Path(parent).glob(".*.tmp-*") if Path(parent).is_dir() else []:
        if stale.is_dir() and not _owned_by_live_process(stale):
            shutil.rmtree(stale, ignore_errors=True)
            reaped.append(stale)
    return reaped


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2); False where the system cannot."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    if rename(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def output_lock(final: AnyPath) -> FileLock:
    """The lock every writer of `final` holds while it writes.

    The lock file lives in the machine's temp dir, named by a hash of the output's absolute path
    (of its URI on an object store), not beside the output: readers list output folders, and a
    lock file can never be removed safely (a waiter may hold it open). Writers on one machine
    exclude each other.
    """
    key = hashlib.sha256((str(final) if is_remote(final) else str(Path(final).resolve())).encode()).hexdigest()[:32]
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    return FileLock(str(LOCK_DIR / f"{key}.lock"))


@contextlib.contextmanager
def atomic_output(final: AnyPath) -> Iterator[AnyPath]:
    """Yield a temp dir beside `final`; on success it replaces `final`, on error it is removed.
    On an object store: an attempt prefix inside `final`, committed by its manifest (`object_attempt`).

    The writer holds the output's lock throughout, so a second writer of the same output waits and
    then writes whole (the kernel frees the lock of a killed process). A killed process leaves only
    a `.<name>.tmp-<host>-<pid>-<start>-*` directory, which readers never look at and the next writer removes once
    its owner is dead. An existing output is replaced by exchanging it with the temp dir, so it
    never goes missing; the old content then sits under the temp dir's name and is removed.
    """
    if is_remote(final):
        with object_attempt(final) as tmp:
            yield tmp
        return
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(final):
        reap_stale(final)
        tmp = final.parent / _temp_name(final)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists() and _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old output
        elif final.exists():  # no atomic exchange here: two renames, the old kept until the new is in
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)


# -- object stores: no rename, the manifest is the commit ----------------------------------------
ATTEMPT_KEY = "attempt"  # the committed manifest's key naming the attempt prefix its files lie under
GRACE_S = 3600.0  # an attempt no manifest names is abandoned once this old
ATTEMPT = re.compile(r"\.attempt-(?P<ms>\d{13})-[0-9a-f]{12}")
_LIVE: set[str] = set()  # attempts this process is writing: never cleaned up under it


def attempt_name() -> str:
    """`.attempt-<ms since epoch>-<random>`: hidden (readers that list a folder skip it), unique, and
    dated, so an abandoned one can be told by its age without a listing of object times."""
    return f".attempt-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def object_attempt(final: UriPath) -> Iterator[UriPath]:
    """Yield a fresh attempt prefix inside `final`; the block writes the output there, its manifest
    (when it writes one) last; then `final/manifest.json`, that manifest plus the attempt's name,
    is written in one PUT: the commit. A block that raises leaves no manifest naming its attempt,
    and the attempt is deleted (a killed writer's is removed by a later writer once abandoned).
    Two writers of one output each commit whole attempts; the last manifest wins."""
    cleanup_attempts(final, GRACE_S)
    tmp = final / attempt_name()
    _LIVE.add(str(tmp))
    try:
        yield tmp
        written = read_manifest(tmp)
        commit = {**(written or {}), ATTEMPT_KEY: tmp.name}
        (final / MANIFEST).write_bytes(manifest_json(commit).encode("utf-8"))
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.fs.delete_dir(tmp.key)
        raise
    finally:
        _LIVE.discard(str(tmp))
    cleanup_attempts(final, GRACE_S)


def committed(path: AnyPath) -> AnyPath:
    """Where the finished output at `path` keeps its files: `path` itself on local disk (the rename
    put them there); on an object store the attempt its manifest names. Readers of an output's
    files go through here, so they read only what a manifest committed."""
    if not is_remote(path):
        return path
    manifest = read_manifest(path) or {}
    attempt = manifest.get(ATTEMPT_KEY)
    if attempt is None:
        return path
    if not isinstance(attempt, str) or not ATTEMPT.fullmatch(attempt):
        raise VersionMismatchError(f"{path}/{MANIFEST}: attempt {attempt!r} is not an attempt name; refused as a path")
    return path / attempt


def cleanup_attempts(final: UriPath, older_than_s: float, keep: Optional[str] = None) -> list[UriPath]:
    """Remove attempts inside `final` that its manifest does not name (nor `keep`), at least
    `older_than_s` old and not being written by this process; returns them."""
    named = keep or (read_manifest(final) or {}).get(ATTEMPT_KEY)
    now_ms = time.time() * 1000
    removed = []
    for child in final.iterdir():
        match = ATTEMPT.fullmatch(child.name)
        if (match is None or child.name == named or str(child) in _LIVE or not child.is_dir()
                or now_ms - int(match["ms"]) < older_than_s * 1000):
            continue
        child.fs.delete_dir(child.key)
        removed.append(child)
    return removed
