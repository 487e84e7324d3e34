"""Loading safety (issue 7, item 6): nothing the platform loads can run code, and nothing changed loads.

- Every `torch.load` in the repo passes `weights_only=True` (read from the source's syntax tree, so a
  new call without it fails here), and nothing unpickles by another road (`pickle`, `cloudpickle`,
  `dill`, `joblib.load`, `pandas.read_pickle`, `np.load` with `allow_pickle=True`, `yaml.load`).
  Calls are resolved through the file's imports, so `from torch import load`, `import torch as t`
  or `from pickle import loads as l` are seen for what they are.
- Ids and versions read from manifests are checked before they become paths (`rundir.valid_id`):
  a VM manifest naming features `../../elsewhere` is refused, nothing outside the run is read.
- FM and VM checkpoints (`platform/fm/checkpoint.py`, `platform/training/checkpoint.py`): one changed
  byte of `model.pt`, or a manifest whose version is not the file's hash, is refused with an error
  naming the file. A pickle payload that would run code is refused even when the attacker also fixed
  the manifest's hash: the loaders unpickle with `weights_only=True`. The payload is live: the same
  bytes loaded without `weights_only` do run it (the control at the end of each case).
- The compressor (`actors/extractor.build_compressor`) and Ray Train's epoch state
  (`training/loop.final_state`) are refused the same way.
- Stores (`platform/store/parquet.open_store`): one byte changed in place, a manifest hash edited, or a
  file the manifest does not list, is refused naming the file.

Already shown elsewhere (not repeated here): a truncated + appended VM `model.pt` refused on a really trained VM
(tests/test_vm_train.py::test_loopfm_vm_trains_on_a_worker_and_its_checkpoint_reproduces_its_test_auc),
a store file grown by a byte or missing, and a store whose pinned fields differ
(tests/test_store.py::test_a_changed_or_missing_file_is_refused,
tests/test_store.py::test_reader_refuses_a_store_that_differs_and_names_the_field), the FM version is
the hash of its weights (tests/test_fm_embed.py::test_current_store_is_skipped_and_the_fm_version_is_its_weights_hash).
"""

from __future__ import annotations

import ast
import io
import json
import pickle
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO
from loopfm.config import CompressConfig, FMConfig, TrainConfig, VMConfig
from loopfm.errors import MissingInputError, VersionMismatchError
from loopfm.fm.checkpoint import FMManifest, load_fm, save_fm
from loopfm.training.checkpoint import VMManifest, load_vm, save_vm
from loopfm.weights import MODEL_FILE, model_hash, state_bytes

SOURCE_DIRS = ("platform", "actors", "models", "tune", "serve_apps", "benchmarks", "tests")
VOCAB = {"user_id": 7, "item_id": 9, "category": 4}


class RunsCode:
    """Unpickling this calls open(path, "w"): a harmless stand-in for any code an attacker picks."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def payload(sentinel: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "evil": RunsCode(sentinel)}, buf)
    return buf.getvalue()


def assert_payload_is_live(data: bytes, sentinel: Path) -> None:
    """The control: the same bytes, unpickled without weights_only, do run the code."""
    assert not sentinel.exists()
    torch.load(io.BytesIO(data), weights_only=False)["evil"].close()
    assert sentinel.exists()


# -- no unsafe loading anywhere ---------------------------------------------------------------


def imports(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from a module's imports (`import torch as t`:
    t -> torch; `from torch import load as l`: l -> torch.load)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def dotted(func: ast.AST, names: dict[str, str]):
    """The full dotted name a call's function resolves to through the imports, or None."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([names.get(func.id, func.id), *reversed(parts)])


UNPICKLERS = {  # every road to unpickling: never called at all
    *(f"{m}.{f}" for m in ("pickle", "cloudpickle", "dill", "_pickle") for f in ("load", "loads", "Unpickler")),
    "joblib.load", "pandas.read_pickle", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "torch.serialization.load",
}


def unsafe_loads(source: str, where: str = "<source>") -> list[str]:
    """`where:line name` of every call in `source` that may unpickle: an unpickler, `torch.load`
    without `weights_only=True`, `np.load` with `allow_pickle=True`."""
    tree = ast.parse(source, where)
    names = imports(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func, names)
        if name is None:
            continue
        name = name.replace("pd.", "pandas.", 1) if name.startswith("pd.") else name
        if (name in UNPICKLERS or (name == "torch.load" and keyword(node, "weights_only") is not True)
                or (name == "numpy.load" and keyword(node, "allow_pickle") is True)):
            found.append(f"{where}:{node.lineno} {name}")
    return found


def keyword(call: ast.Call, name: str):
    return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), None)


def repo_sources():
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.resolve() != Path(__file__).resolve():  # this file unpickles its own payload on purpose
                yield path


def test_every_torch_load_is_weights_only_and_nothing_else_unpickles():
    found = [hit for path in repo_sources() for hit in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []
    loads = sum(path.read_text().count("torch.load(") for path in repo_sources())
    assert loads >= 5  # FM/VM weights, compressor, Train state (resume and final), ...: the scan saw them


@pytest.mark.parametrize("source", [
    "from torch import load\nload(f)",
    "from torch import load as fetch\nfetch(f, weights_only=False)",
    "import torch as t\nt.load(f)",
    "import torch\ntorch.serialization.load(f, weights_only=True)",
    "import cloudpickle\ncloudpickle.loads(b)",
    "from pickle import loads as l\nl(b)",
    "import joblib\njoblib.load(p)",
    "import pandas as pd\npd.read_pickle(p)",
    "from pandas import read_pickle\nread_pickle(p)",
    "import numpy\nnumpy.load(p, allow_pickle=True)",
    "import numpy as np\nnp.load(p, allow_pickle=True)",
    "import dill\ndill.load(f)",
])
def test_the_scan_sees_through_aliases_and_other_unpicklers(source):
    assert len(unsafe_loads(source)) == 1, source


def test_the_scan_lets_safe_loads_pass():
    safe = ("import torch as t\nt.load(f, weights_only=True)\nimport numpy as np\nnp.load(p)\n"
            "import pandas as pd\npd.read_parquet(p)\nfrom json import loads\nloads(s)")
    assert unsafe_loads(safe) == []


def test_a_manifest_id_that_is_a_path_is_refused_before_it_is_read(vm_dir, tmp_path):
    """A VM manifest whose features fingerprint climbs out of the run is refused, naming the field."""
    from loopfm.rundir import RunDir
    from loopfm.serve_apps.bundle import Bundle

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text("{}")
    run = RunDir(tmp_path / "run").ensure()
    set_manifest(vm_dir, "features_fingerprint", "../../outside")
    with pytest.raises(VersionMismatchError, match=r"features fingerprint '\.\./\.\./outside' is not an id"):
        Bundle.open(run.root, vm_dir)
    for method, args in ((run.store, ("..",)), (run.fm, ("a/b",)), (run.vm, ("../kd", 0, "f")),
                         (run.store_deltas, (".hidden",)), (run.features, ("",))):
        with pytest.raises(VersionMismatchError, match="is not an id"):
            method(*args)


# -- FM and VM checkpoints --------------------------------------------------------------------


def tiny_fm_cfg() -> FMConfig:
    return FMConfig(d_model=8, n_layers=1, n_heads=2, d_ff=16, window=4, chunk_len=8)


@pytest.fixture
def fm_dir(tmp_path) -> Path:
    from loopfm.models.fm import CausalFM

    torch.manual_seed(0)
    cfg = tiny_fm_cfg()
    model = CausalFM(cfg, VOCAB, num_surfaces=2)
    (tmp_path / "fm").mkdir()
    save_fm(tmp_path / "fm", state_bytes(model), FMManifest(fingerprint="f", fm_version="",
                                                     fm=cfg.model_dump(mode="json"),
                                                     vocab_sizes=VOCAB, num_surfaces=2, splits_fingerprint="s"))
    return tmp_path / "fm"


@pytest.fixture
def vm_dir(tmp_path) -> Path:
    from loopfm.models.inputs import InputSpec
    from loopfm.models.vm import build_vm

    torch.manual_seed(0)
    cfg = VMConfig(hidden=[8])
    model = build_vm(cfg, InputSpec(VOCAB, (3,), seq_width=4))
    manifest = VMManifest(fingerprint="f", model_version="", arm="kd_loopfm", seed=0, features_fingerprint="ff",
                          store_version="s", vm=cfg.model_dump(mode="json"),
                          train=TrainConfig().model_dump(mode="json"),
                          vocab_sizes=VOCAB, context_columns=["c"], context_sizes=[3], seq_len=4, seq_width=4,
                          raw_seq_len=3)
    (tmp_path / "vm").mkdir()
    save_vm(tmp_path / "vm", state_bytes(model), manifest)
    return tmp_path / "vm"


LOADERS = {"fm": (load_fm, "fm_version"), "vm": (load_vm, "model_version")}


@pytest.fixture(params=list(LOADERS))
def checkpoint(request, fm_dir, vm_dir):
    """(directory, loader, manifest field holding the hash) for an FM and a VM checkpoint."""
    directory = fm_dir if request.param == "fm" else vm_dir
    return (directory, *LOADERS[request.param])


def set_manifest(directory: Path, field: str, value: str) -> None:
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    raw[field] = value
    path.write_text(json.dumps(raw))


def test_an_untouched_checkpoint_loads_the_saved_weights(checkpoint):
    directory, load, field = checkpoint
    model, manifest = load(directory)
    assert getattr(manifest, field) == model_hash((directory / MODEL_FILE).read_bytes())
    saved = torch.load(directory / MODEL_FILE, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_one_changed_byte_is_refused_naming_the_file(checkpoint, where):
    directory, load, _ = checkpoint
    path = directory / MODEL_FILE
    data = bytearray(path.read_bytes())
    i = int(where * (len(data) - 1)) if where >= 0 else len(data) - 1
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(VersionMismatchError, match="does not match its manifest") as err:
        load(directory)
    assert str(path) in str(err.value)


def test_a_manifest_hash_that_does_not_match_is_refused_naming_the_file(checkpoint):
    directory, load, field = checkpoint
    set_manifest(directory, field, "0" * 16)
    with pytest.raises(VersionMismatchError, match="version 0000000000000000") as err:
        load(directory)
    assert str(directory / MODEL_FILE) in str(err.value)


def test_missing_weights_are_refused_naming_the_file(checkpoint):
    directory, load, _ = checkpoint
    (directory / MODEL_FILE).unlink()
    with pytest.raises(MissingInputError, match=str(directory / MODEL_FILE)):
        load(directory)


def test_a_pickle_payload_is_refused_even_with_a_matching_hash(checkpoint, tmp_path_factory):
    directory, load, field = checkpoint
    sentinel = tmp_path_factory.mktemp("attack") / "code-ran"
    data = payload(sentinel)
    (directory / MODEL_FILE).write_bytes(data)
    set_manifest(directory, field, model_hash(data))  # the attacker fixed the hash too
    with pytest.raises(VersionMismatchError, match=rf"{MODEL_FILE} is not a weights-only torch file"):
        load(directory)
    assert_payload_is_live(data, sentinel)


# -- the compressor and Ray Train's epoch state -----------------------------------------------


def test_compressor_weights_with_a_payload_are_refused(tmp_path):
    from loopfm.actors.extractor import build_compressor

    sentinel = tmp_path / "code-ran"
    spec = {"raw_width": 8, "compress": CompressConfig().model_dump(mode="json"), "weights": payload(sentinel)}
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        build_compressor(spec)
    assert_payload_is_live(spec["weights"], sentinel)


def test_train_state_with_a_payload_is_refused(tmp_path):
    from loopfm.training.loop import STATE_FILE, final_state

    sentinel = tmp_path / "code-ran"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / STATE_FILE).write_bytes(payload(sentinel))

    @contextmanager
    def as_directory():
        yield str(tmp_path / "ckpt")

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        final_state(SimpleNamespace(checkpoint=SimpleNamespace(as_directory=as_directory)))
    assert_payload_is_live((tmp_path / "ckpt" / STATE_FILE).read_bytes(), sentinel)


# -- stores -----------------------------------------------------------------------------------


import test_store  # noqa: E402

store = test_store.store  # the sealed 25-row store fixture


def test_store_file_with_one_byte_changed_in_place_is_refused(store):
    from loopfm.store.parquet import open_store

    path = store / "part-1.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, same name: only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(VersionMismatchError, match="part-1.parquet does not match the hash in its manifest"):
        open_store(store)


def test_store_manifest_hash_edited_or_an_unlisted_file_is_refused(store):
    from test_store import write_rows

    from loopfm.store.parquet import open_store

    raw = json.loads((store / "manifest.json").read_text())
    raw["files"]["part-0.parquet"] = "0" * 64
    (store / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(VersionMismatchError, match="part-0.parquet does not match the hash in its manifest"):
        open_store(store)
    write_rows(store, np.arange(25, 30), "part-2.parquet")  # rows slipped in after sealing
    with pytest.raises(VersionMismatchError, match=r"unexpected \['part-2.parquet'\]"):
        open_store(store)


@pytest.mark.parametrize("kind", ["fm", "vm"])
def test_a_manifest_missing_a_field_is_refused_by_name(kind, tmp_path):
    import json

    from loopfm.rundir import MANIFEST

    cls = FMManifest if kind == "fm" else VMManifest
    field = "fm_version" if kind == "fm" else "model_version"
    (tmp_path / MANIFEST).write_text(json.dumps({"created_at": "now"}))
    with pytest.raises(VersionMismatchError,
                       match=rf"manifest.json lacks \[.*'{field}'.*\]: not a complete {cls.__name__}"):
        cls.read(tmp_path)
