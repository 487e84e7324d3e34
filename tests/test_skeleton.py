"""The stage skeleton (`loopfm.skeleton`): built once, skipped when current, nothing published by a
build that fails, the manifest written last; and every stage goes through it (pure: no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loopfm.rundir import MANIFEST, write_manifest
from loopfm.skeleton import current, publish, run_stage

REPO = Path(__file__).resolve().parents[1]
WRITERS = ("platform/rundir.py", "platform/skeleton.py", "platform/store/parquet.py")


def _builder(calls: list, fingerprint: str, payload: str = "data"):
    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "part-0").write_text(payload)
        return {"fingerprint": fingerprint, "rows": 1}
    return build


def _read(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def test_a_current_output_is_read_not_rebuilt_and_a_new_fingerprint_rebuilds(tmp_path):
    out, calls = tmp_path / "stage", []
    first = run_stage("test", out, "f1", _builder(calls, "f1"), read=_read, ray=None)
    again = run_stage("test", out, "f1", _builder(calls, "f1"), read=_read, ray=None)
    assert len(calls) == 1 and first["rows"] == again["rows"] == 1
    assert _read(out)["fingerprint"] == "f1" and "created_at" in _read(out)
    run_stage("test", out, "f2", _builder(calls, "f2", "new"), read=_read, ray=None)
    assert len(calls) == 2 and _read(out)["fingerprint"] == "f2" and (out / "part-0").read_text() == "new"
    assert current("test", out, "f1", _read) is None and current("test", out, "f2", _read)["fingerprint"] == "f2"


def test_a_failing_build_publishes_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "stage"
    run_stage("test", out, "f1", _builder([], "f1", "old"), read=_read, ray=None)

    def broken(tmp: Path) -> dict:
        (tmp / "part-0").write_text("half")
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        run_stage("test", out, "f2", broken, read=_read, ray=None)
    assert _read(out)["fingerprint"] == "f1" and (out / "part-0").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]  # no temp directory left behind
    with pytest.raises(RuntimeError):
        publish(tmp_path / "never", broken)
    assert not (tmp_path / "never").exists()


def test_a_manifest_the_build_wrote_itself_is_kept(tmp_path):
    """`seal`, `save_fm` and `save_vm` write their manifest: publish must not overwrite it."""
    def sealing(tmp: Path) -> dict:
        write_manifest(tmp, {"fingerprint": "f", "sealed": True})
        return {"fingerprint": "f", "sealed": False}

    publish(tmp_path / "out", sealing)
    assert _read(tmp_path / "out")["sealed"] is True
    with pytest.raises(TypeError, match="not a manifest"):
        publish(tmp_path / "bad", lambda tmp: 42)
    assert not (tmp_path / "bad").exists()


def test_no_stage_writes_an_output_around_the_skeleton():
    """Only the run directory, the skeleton and the store backend's local commit (a storage layer
    under the stages) open an atomic output: a stage that did it by hand would skip the
    fingerprint check or the manifest-last rule without anyone noticing."""
    pattern = re.compile(r"\batomic_output\(|\bis_complete\(")
    offenders = []
    for folder in ("platform", "serve_apps", "tune", "actors"):
        for path in (REPO / folder).rglob("*.py"):
            if str(path.relative_to(REPO)) in WRITERS:
                continue
            code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith(("#", "`"))]
            offenders += [f"{path.relative_to(REPO)}: {line.strip()}" for line in code
                          if pattern.search(line.split("#")[0]) and '"""' not in line]
    assert offenders == []
