"""Where a run directory lives (`loopfm.location`, `RunDir`, `loopfm --out`): a local path, or a URI
on a filesystem pyarrow resolves; anything else is refused by name, never taken for a local folder.

On an object store every output commits by its manifest (`rundir.object_attempt`): the tests with
`s3_bucket` run against moto's S3 server on loopback, a real HTTP S3 API in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopfm import cli
from loopfm.errors import UnsupportedLocationError
from loopfm.location import UriPath, as_location
from loopfm.rundir import (
    ATTEMPT,
    ATTEMPT_KEY,
    MANIFEST,
    RunDir,
    atomic_output,
    atomic_write_text,
    cleanup_attempts,
    committed,
    local_path,
    read_manifest,
    write_manifest,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
KILLED_WRITER = """
import os, sys
from loopfm.rundir import RunDir, atomic_output
out = RunDir(sys.argv[1]).root / "out"
writing = atomic_output(out)
tmp = writing.__enter__()
(tmp / "part-0.parquet").write_bytes(b"new, never committed")
print(tmp.name, flush=True)
os._exit(1)  # killed after its data, before its manifest
"""


@pytest.mark.parametrize("uri", ["ftp://host/runs/x", "http://host/x", "webdav://host/x", "s4://bucket/x"])
def test_a_uri_of_an_unsupported_scheme_is_refused_naming_it(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsupportedLocationError, match="s3://") as err:
        RunDir(uri)
    assert repr(uri) in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no local folder named after the scheme


@pytest.mark.parametrize("uri", ["s3://bucket/x?endpoint_override=127.0.0.1:9000", "s3://bucket/x?access_key=AKIA",
                                 "s3:///no-bucket"])
def test_an_s3_uri_with_a_query_or_without_a_bucket_is_refused(uri):
    """The endpoint and secrets come from the environment: a query would reach manifests and logs."""
    with pytest.raises(UnsupportedLocationError, match="AWS_ENDPOINT_URL"):
        RunDir(uri)


@pytest.mark.parametrize("uri", ["s3://bucket/runs/x", "S3://bucket/runs/x/", "gs://bucket/x"])
def test_an_object_store_uri_is_a_remote_run_directory(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunDir(uri)
    assert run.remote and isinstance(run.root, UriPath)
    assert str(run.root) == uri.rstrip("/").replace("S3://", "s3://")
    assert str(run.fm("abc")) == f"{run.root}/fm/abc" and run.fm("abc").parent.name == "fm"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError):
        Path(run.root)  # no __fspath__: never silently a local path
    with pytest.raises(UnsupportedLocationError):
        local_path(uri)


def test_file_uri_and_plain_paths_map_to_the_local_path(tmp_path):
    assert RunDir(f"file://{tmp_path}/run").root == tmp_path / "run"
    assert RunDir(f"file://localhost{tmp_path}/a%20b").root == tmp_path / "a b"
    assert RunDir(tmp_path / "run").root == tmp_path / "run"
    assert not RunDir(tmp_path).remote
    assert as_location("runs/s3:x") == Path("runs/s3:x")  # a colon inside a path is not a scheme


def test_file_uri_naming_another_host_is_refused():
    with pytest.raises(UnsupportedLocationError, match="file://"):
        RunDir("file://otherhost/runs/x")


def test_cli_out_with_an_unsupported_scheme_exits_2_with_the_message_and_writes_nothing(tmp_path, monkeypatch,
                                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["data", "generate", "--config", str(CONFIG), "--out", "ftp://bucket/x"])
    assert code == 2
    assert "'ftp://bucket/x'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- on a loopback S3 server --------------------------------------------------------------------
def _keys(root: UriPath) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_an_output_on_s3_is_its_attempt_committed_by_the_manifest_written_last(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunDir(f"{s3_bucket}/run")
    out = run.root / "out"
    with atomic_output(out) as tmp:
        (tmp / "data.bin").write_bytes(b"first")
        assert read_manifest(out) is None  # nothing committed while the block runs
        write_manifest(tmp, {"fingerprint": "f1"})
    manifest = read_manifest(out)
    assert manifest["fingerprint"] == "f1" and ATTEMPT.fullmatch(manifest[ATTEMPT_KEY])
    assert committed(out) == out / manifest[ATTEMPT_KEY]
    assert (committed(out) / "data.bin").read_bytes() == b"first"
    assert _keys(out) == sorted([MANIFEST, f"{manifest[ATTEMPT_KEY]}/data.bin", f"{manifest[ATTEMPT_KEY]}/{MANIFEST}"])
    atomic_write_text(run.root / "report" / "r.json", json.dumps({"auc": 0.5}))
    assert json.loads((run.root / "report" / "r.json").read_text()) == {"auc": 0.5}
    assert list(tmp_path.iterdir()) == []  # nothing local under the cwd


def test_a_failed_writer_on_s3_leaves_the_committed_output_and_no_attempt(s3_bucket):
    out = RunDir(f"{s3_bucket}/run").root / "out"
    with atomic_output(out) as tmp:
        (tmp / "data.bin").write_bytes(b"first")
    before = read_manifest(out)
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        (tmp / "data.bin").write_bytes(b"second")
        raise RuntimeError("the stage failed")
    assert read_manifest(out) == before
    assert (committed(out) / "data.bin").read_bytes() == b"first"
    assert [p.name for p in out.iterdir() if ATTEMPT.fullmatch(p.name)] == [before[ATTEMPT_KEY]]


def test_a_killed_writer_on_s3_is_never_read_and_its_attempt_is_cleaned_up_once_abandoned(s3_bucket):
    root = f"{s3_bucket}/run"
    out = RunDir(root).root / "out"
    with atomic_output(out) as tmp:
        (tmp / "part-0.parquet").write_bytes(b"committed")
        write_manifest(tmp, {"fingerprint": "f1"})
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, root], capture_output=True, text=True, timeout=60)
    assert killed.returncode == 1, killed.stderr
    abandoned = killed.stdout.strip()
    assert (out / abandoned / "part-0.parquet").is_file()  # its data is there ...
    assert read_manifest(out)[ATTEMPT_KEY] != abandoned  # ... but no manifest names it
    assert (committed(out) / "part-0.parquet").read_bytes() == b"committed"
    assert cleanup_attempts(out, older_than_s=3600) == []  # within the grace period: perhaps still writing
    time.sleep(0.01)
    assert [p.name for p in cleanup_attempts(out, older_than_s=0)] == [abandoned]
    assert (committed(out) / "part-0.parquet").read_bytes() == b"committed"


def test_a_manifest_naming_a_path_outside_its_output_is_refused(s3_bucket):
    out = RunDir(f"{s3_bucket}/run").root / "out"
    (out / MANIFEST).write_text(json.dumps({ATTEMPT_KEY: "../../elsewhere"}))
    with pytest.raises(Exception, match="not an attempt name"):
        committed(out)


@pytest.mark.parametrize(("words", "options", "why"), [
    (["bench"], ["extract"], "URI (s3://bucket/x) yet"),
    (["store", "compact"], [], "no lock"),
    (["logs", "append"], ["--files", "new.parquet"], "no lock"),
    (["cycle"], ["--files", "new.parquet"], "no lock"),
])
def test_a_command_not_converted_to_uris_refuses_one_naming_itself(words, options, why, tmp_path, monkeypatch,
                                                                   capsys):
    """Refused before anything runs, saying why: not converted yet, or a writer that needs a lock."""
    monkeypatch.chdir(tmp_path)
    code = cli.main([*words, "--config", str(CONFIG), "--out", "s3://bucket/x", *options])  # bench: args last
    err = capsys.readouterr().err
    assert code == 2 and f"`loopfm {' '.join(words)}` does not run on a run directory given as a URI" in err
    assert why in err and "data generate" in err and "serve build" in err and list(tmp_path.iterdir()) == []
