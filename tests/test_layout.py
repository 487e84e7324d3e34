"""The namespace layout must never shadow the standard library's `platform` module."""

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.ray
def test_stdlib_platform_wins_from_repo_root():
    # `-c` puts '' (the working directory, the repo root) first on sys.path.
    code = "import sys, platform; assert sys.path[0] in ('', '.'), sys.path[0]; print(platform.system())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() in {"Linux", "Darwin", "Windows"}


@pytest.mark.ray
def test_stdlib_platform_wins_with_repo_root_as_sys_path0():
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import platform; "
        "assert hasattr(platform, 'system'), platform; print(platform.system())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() in {"Linux", "Darwin", "Windows"}


def test_platform_folder_has_no_init():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_loopfm_maps_onto_the_design_folders():
    import loopfm.actors
    import loopfm.config
    import loopfm.models
    import loopfm.serve_apps
    import loopfm.tune

    assert loopfm.config.__file__.startswith(str(REPO / "platform"))
    for mod, folder in [(loopfm.actors, "actors"), (loopfm.models, "models"), (loopfm.tune, "tune"),
                        (loopfm.serve_apps, "serve_apps")]:
        assert mod.__file__.startswith(str(REPO / folder)), mod.__file__
