"""Run-directory writers under concurrency and kills (`rundir.atomic_output`): nothing lost, nothing
half-visible. Real processes write one output; the test kills them by pid at the worst points."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loopfm.rundir import atomic_output, is_complete, write_manifest

pytestmark = [pytest.mark.timeout(120), pytest.mark.ray]

FILES = 8
WRITER = """
import sys, time
from pathlib import Path
from loopfm.rundir import atomic_output, write_manifest
final, tag, gate = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
with atomic_output(final) as tmp:
    for i in range({half}):
        (tmp / f"part-{{i}}").write_text(tag)
    (gate / f"{{tag}}.ready").write_text(str(tmp))
    while not (gate / f"{{tag}}.go").exists():  # the worst point: half written, the lock held
        time.sleep(0.02)
    for i in range({half}, {files}):
        (tmp / f"part-{{i}}").write_text(tag)
    write_manifest(tmp, {{"tag": tag}})
""".format(half=FILES // 2, files=FILES)
REPLACER = f"""
import sys
from pathlib import Path
from loopfm.rundir import atomic_output, write_manifest
final, n = Path(sys.argv[1]), int(sys.argv[2])
for k in range(n):
    with atomic_output(final) as tmp:
        for i in range({FILES}):
            (tmp / f"part-{{i}}").write_text(str(k))
        write_manifest(tmp, {{"tag": str(k)}})
"""


def write(final: Path, tag: str) -> None:
    with atomic_output(final) as tmp:
        for i in range(FILES):
            (tmp / f"part-{i}").write_text(tag)
        write_manifest(tmp, {"tag": tag})


def whole(final: Path) -> str:
    """The tag of a complete output; fails on a missing, mixed or partial one."""
    tags = {(final / f"part-{i}").read_text() for i in range(FILES)}
    assert len(tags) == 1 and is_complete(final), (final, tags)
    return tags.pop()


def start(script: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"writer exited with {proc.returncode} before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout:.0f} s"
        time.sleep(0.02)


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def leftovers(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_second_writer_waits_for_the_first_and_never_reaps_its_temp_dir(tmp_path):
    """Two processes write one output: the second starts while the first is half-way. The second
    must neither delete the first's temp dir (a live writer's) nor mix files with it."""
    final, gate = tmp_path / "out", tmp_path
    first = start(WRITER, final, "first", gate)
    wait_for(gate / "first.ready", first)
    first_tmp = Path((gate / "first.ready").read_text())
    second = start(WRITER, final, "second", gate)
    (gate / "second.go").write_text("")  # the second would run straight through if it could
    time.sleep(1.5)  # long enough for it to start and reach the output
    assert first_tmp.is_dir(), "the second writer removed a live writer's temp dir"
    assert not final.exists(), "the second writer published while the first held the output"
    (gate / "first.go").write_text("")
    assert first.wait(30) == 0 and second.wait(30) == 0
    assert whole(final) == "second" and leftovers(final) == []


def test_a_writer_killed_half_way_loses_nothing_and_its_leftovers_are_reaped(tmp_path):
    final, gate = tmp_path / "out", tmp_path
    write(final, "v0")
    (tmp_path / ".out.old-0badc0de").mkdir()  # what a writer killed between two renames used to leave
    victim = start(WRITER, final, "victim", gate)
    wait_for(gate / "victim.ready", victim)
    victim_tmp = Path((gate / "victim.ready").read_text())
    os.kill(victim.pid, signal.SIGKILL)  # half written, lock held
    while not _zombie(victim.pid):  # dead, not yet waited for: how a killed writer often lingers
        time.sleep(0.02)
    assert whole(final) == "v0" and victim_tmp.is_dir()
    write(final, "v1")  # the kernel freed the dead writer's lock; its temp dir is reaped
    assert whole(final) == "v1" and leftovers(final) == []
    victim.wait(30)


def test_replacing_an_output_leaves_no_moment_without_it(tmp_path):
    """A reader polls while another process replaces the output over and over: every look finds a
    complete output (the replacement is one atomic exchange, not two renames)."""
    final = tmp_path / "out"
    write(final, "start")
    replacer = start(REPLACER, final, 150)
    looks, missing = 0, []
    stop = threading.Event()

    def look() -> None:
        nonlocal looks
        while not stop.is_set():
            looks += 1
            if not (final / "manifest.json").is_file():
                missing.append(looks)

    reader = threading.Thread(target=look)
    reader.start()
    try:
        assert replacer.wait(60) == 0
    finally:
        stop.set()
        reader.join()
    assert looks > 200 and not missing, f"{len(missing)} of {looks} looks found no output"
    assert whole(final) == "149" and leftovers(final) == []
