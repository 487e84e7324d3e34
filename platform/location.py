"""Where a run directory lives: a local path, or a URI on a `pyarrow.fs` filesystem (`s3://`, `gs://`, ...).

A local run directory is a `pathlib.Path`. A URI becomes a `UriPath`: the few `pathlib` operations
the stages use (join, name, parent, exists/is_file/is_dir, iterdir/glob/rglob, read/write of bytes
and text, mkdir, unlink, rename) over the filesystem `pyarrow.fs.FileSystem.from_uri` resolves, and
`str()` is the URI itself, which Ray Data, Ray Train and pyarrow's readers and writers resolve the
same way on every node. It has no `__fspath__` on purpose: `open()`, `Path()` or `shutil` on it
fail loudly instead of writing a local folder named after the scheme.

Credentials and the endpoint come from the environment every process shares (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, AWS_REGION, the instance profile): a URI with a query string (`?endpoint_override=`,
`?access_key=`) is refused, so a URI resolves alike on every Ray worker and no secret is ever
written into a manifest or a log line.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import os
import posixpath
import re
import shutil
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Union

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from loopfm.errors import UnsupportedLocationError

SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
# URI schemes pyarrow.fs resolves (FileSystem.from_uri): the module each needs in this pyarrow build
SUPPORTED = {"s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem", "hdfs": "HadoopFileSystem",
             "viewfs": "HadoopFileSystem", "abfs": "AzureFileSystem", "abfss": "AzureFileSystem"}


@functools.lru_cache(maxsize=32)
def filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """The filesystem of `scheme://bucket`, resolved once per process (from the environment)."""
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return fs


class UriPath:
    """A path on a remote filesystem, as `scheme` and the filesystem's own path (`bucket/key`)."""

    __slots__ = ("scheme", "key")

    def __init__(self, scheme: str, key: str):
        self.scheme = scheme
        self.key = key.strip("/")

    def __reduce__(self):  # pickled as its URI: the filesystem is resolved again where it is used
        return (UriPath, (self.scheme, self.key))

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.scheme, self.key.split("/", 1)[0])

    # -- pure path -------------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"UriPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UriPath) and (self.scheme, self.key) == (other.scheme, other.key)

    def __hash__(self) -> int:
        return hash((self.scheme, self.key))

    def __lt__(self, other: UriPath) -> bool:
        return self.key < other.key

    def __truediv__(self, part: Union[str, os.PathLike]) -> UriPath:
        return UriPath(self.scheme, posixpath.join(self.key, os.fspath(part)))

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> UriPath:
        return UriPath(self.scheme, posixpath.dirname(self.key) or self.key)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.key.split("/"))

    def with_name(self, name: str) -> UriPath:
        return self.parent / name

    def relative_to(self, other: UriPath) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key)

    def resolve(self) -> UriPath:
        return self

    absolute = resolve

    # -- queries -----------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> SimpleNamespace:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        return SimpleNamespace(st_size=info.size or 0, st_mtime=info.mtime.timestamp() if info.mtime else 0.0,
                               st_mtime_ns=info.mtime_ns or 0)

    def _children(self, recursive: bool) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.key, recursive=recursive, allow_not_found=True))

    def iterdir(self) -> Iterator[UriPath]:
        for info in self._children(recursive=False):
            yield UriPath(self.scheme, info.path)

    def glob(self, pattern: str) -> Iterator[UriPath]:
        """Children whose name matches `pattern` (one level: no `/` or `**` in it)."""
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def rglob(self, pattern: str) -> Iterator[UriPath]:
        for info in self._children(recursive=True):
            if fnmatch.fnmatchcase(posixpath.basename(info.path), pattern):
                yield UriPath(self.scheme, info.path)

    # -- content -----------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.key) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """The whole object in one PUT: readers see all of it or none (object stores do not append)."""
        with self.fs.open_output_stream(self.key) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb"):
        """A binary stream ('rb': seekable, 'wb'), or text over one ('r', 'w')."""
        if mode in ("rb", "r"):
            stream = self.fs.open_input_file(self.key)
        elif mode in ("wb", "w"):
            stream = self.fs.open_output_stream(self.key)
        else:
            raise ValueError(f"{self}: mode {mode!r} is not supported on {self.scheme}://")
        return stream if "b" in mode else io.TextIOWrapper(stream, encoding="utf-8")

    # -- changes -----------------------------------------------------------------------------
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to make on an object store (a prefix exists once it holds an object)."""
        if not exist_ok and self.is_file():
            raise FileExistsError(str(self))

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.is_file():
            return
        self.fs.delete_file(self.key)

    def rename(self, target: UriPath) -> UriPath:
        """A file moved, or a folder moved file by file (an object store has no folder rename: each
        object is copied and deleted; the caller renames only inside its own unpublished attempt)."""
        if self.is_file():
            self.fs.move(self.key, target.key)
            return target
        for info in self._children(recursive=True):
            if info.type == pafs.FileType.File:
                self.fs.move(info.path, f"{target.key}/{posixpath.relpath(info.path, self.key)}")
        self.fs.delete_dir(self.key)
        return target


AnyPath = Union[Path, UriPath]
Location = Union[str, os.PathLike, UriPath]  # what a caller may give: a path, a URI string or a UriPath


def as_location(location: Location) -> AnyPath:
    """A run directory's location: a plain path or `file://` URI as a local `Path`, a URI of a
    scheme pyarrow.fs resolves as a `UriPath`; any other URI is refused by name, never taken for a
    relative path (`Path("s3://b/x")` is the local folder `s3:/b/x`)."""
    if isinstance(location, UriPath):
        return location
    text = os.fspath(location)
    match = SCHEME.match(text) if isinstance(text, str) else None
    if match is None:
        return Path(text)
    scheme = match["scheme"].lower()
    parsed = urllib.parse.urlparse(text)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise UnsupportedLocationError(
                f"run directory {text!r}: a file:// URI must name a local absolute path (file:///abs/path)")
        return Path(urllib.parse.unquote(parsed.path))
    if scheme not in SUPPORTED or not hasattr(pafs, SUPPORTED[scheme]):
        known = ", ".join(f"{s}://" for s in sorted(SUPPORTED) if hasattr(pafs, SUPPORTED[s]))
        raise UnsupportedLocationError(
            f"run directory {text!r}: {scheme}:// is not a filesystem pyarrow resolves here; give a local path "
            f"(runs/x, file:///abs/path) or a URI of {known}")
    if parsed.query or parsed.fragment or not parsed.netloc:
        raise UnsupportedLocationError(
            f"run directory {text!r}: give {scheme}://bucket/prefix with no query: the endpoint, region and "
            "credentials come from the environment (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, or the "
            "instance profile), so every Ray worker resolves the same URI and no secret lands in a manifest")
    return UriPath(scheme, f"{parsed.netloc}{parsed.path}")


def remove_tree(path: AnyPath) -> None:
    """A folder and everything in it, wherever it lives (missing: nothing to do)."""
    if isinstance(path, UriPath):
        if path.is_dir():
            path.fs.delete_dir(path.key)
        return
    shutil.rmtree(path, ignore_errors=True)


def is_remote(path: object) -> bool:
    return isinstance(path, UriPath)


def parquet_dataset(paths: Sequence[Union[AnyPath, str]]) -> pads.Dataset:
    """`pyarrow.dataset.dataset` of parquet files given as local paths or URIs (pyarrow takes a list of
    URIs only as keys on one filesystem)."""
    where = [as_location(p) for p in paths]
    if where and is_remote(where[0]):
        return pads.dataset([p.key for p in where], format="parquet", filesystem=where[0].fs)
    return pads.dataset([str(p) for p in where], format="parquet")


def as_path(path: Union[AnyPath, str]) -> AnyPath:
    """`path` as a local `Path`, unless it is already a remote `UriPath`."""
    return path if is_remote(path) else Path(path)


def copy_tree(local: Path, dest: AnyPath) -> None:
    """Every file under the local folder `local` into `dest` (a local folder or a URI's prefix),
    added to what is there; a file of the same name is replaced."""
    if is_remote(dest):
        pafs.copy_files(str(local), dest.key, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
        return
    shutil.copytree(local, dest, dirs_exist_ok=True)


def fs_path(path: AnyPath) -> str:
    """`path` as its filesystem names it (what a `pyarrow.fs` backend rooted there takes): the
    `bucket/key` of a URI, the path itself locally."""
    return path.key if is_remote(path) else str(path)


def beside(anchor: AnyPath, path: str) -> AnyPath:
    """A path a filesystem gave back (`fs_path` form) as a location on the filesystem of `anchor`."""
    return UriPath(anchor.scheme, path) if is_remote(anchor) else Path(path)
