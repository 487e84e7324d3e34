"""A run directory given as a URI is never taken for a local folder (`RunDir`, `loopfm --out`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopfm import cli
from loopfm.errors import UnsupportedLocationError
from loopfm.rundir import RunDir, local_path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


@pytest.mark.parametrize("uri", ["s3://bucket/runs/x", "gs://bucket/x", "S3://bucket/x", "hdfs://nn:8020/runs/x",
                                 "abfs://container@account/x"])
def test_an_object_store_uri_is_refused_naming_the_value_and_what_is_supported(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsupportedLocationError, match="file:///abs/path") as err:
        RunDir(uri)
    assert repr(uri) in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no local folder named after the scheme


def test_file_uri_and_plain_paths_map_to_the_local_path(tmp_path):
    assert RunDir(f"file://{tmp_path}/run").root == tmp_path / "run"
    assert RunDir(f"file://localhost{tmp_path}/a%20b").root == tmp_path / "a b"
    assert RunDir(tmp_path / "run").root == tmp_path / "run"
    assert local_path("runs/s3:x") == Path("runs/s3:x")  # a colon inside a path is not a scheme


def test_file_uri_naming_another_host_is_refused():
    with pytest.raises(UnsupportedLocationError, match="file://"):
        RunDir("file://otherhost/runs/x")


def test_cli_out_with_a_scheme_exits_2_with_the_message_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["data", "generate", "--config", str(CONFIG), "--out", "s3://bucket/x"])
    assert code == 2
    assert "'s3://bucket/x'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
