"""Issue 14, kind 7: interrupted, killed and concurrent runs never lose or half-replace an output.

Signals are real (``os.kill`` of this process, or of a child CLI process); the rename window is
tested by failing ``os.replace`` in place and by SIGKILL-ing a child process between the renames.
Each case checks the exit code, the one-line message and a snapshot of the directory around ``--out``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import pi05_export.export as export_mod
from pi05_export.artifacts import Manifest, output_lock, staging_dir
from pi05_export.cli import run
from tests.snapshot import last_line, snapshot

SOURCE = {"kind": "random", "preset": "tiny", "config_file": None, "seed": 0}
ONNX = ["onnx", "--preset", "tiny", "--random-init", "--components", "projections", "--out"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from pi05_export.checkpoint import random_model
    from pi05_export.export import export_onnx

    out = tmp_path_factory.mktemp("pristine") / "out"
    export_onnx(random_model("tiny", seed=0), out, source=SOURCE, components="projections")
    (out / "engines").mkdir()  # a downstream artifact that a re-export keeps
    (out / "engines" / "plan.json").write_text("{}")
    return out


@pytest.fixture
def previous(tmp_path, pristine) -> Path:
    """tmp_path/out: the previous export that an interrupted run must leave as it was."""
    out = tmp_path / "out"
    shutil.copytree(pristine, out)
    return out


def _export_calls(monkeypatch, action) -> None:
    real = export_mod.export_component

    def wrapped(*args, **kwargs):
        action()
        return real(*args, **kwargs)

    monkeypatch.setattr(export_mod, "export_component", wrapped)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_export_exits_cleanly(previous, tmp_path, capsys, monkeypatch, signum, code):
    _export_calls(monkeypatch, lambda: os.kill(os.getpid(), signum))
    before = snapshot(tmp_path)
    assert run([*ONNX, str(previous)]) == code
    assert last_line(capsys.readouterr().err) == (f"error: interrupted by {signal.Signals(signum).name}; "
                                                  "no partial output was left (hint: run the command again)")
    assert snapshot(tmp_path) == before  # previous export untouched, no OUT.tmp-*, no OUT.lock


def test_interrupt_swallowed_by_cleanup_code_still_cancels(previous, tmp_path, capsys, monkeypatch):
    """Ctrl-C landing in a finalizer: Python prints-and-ignores the exception there, the export goes on;
    the recorded signal still cancels the commit, so the previous output stays and the exit is 130."""

    class Finalizer:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)

    _export_calls(monkeypatch, Finalizer)  # created and collected at once: the interrupt fires inside __del__
    before = snapshot(tmp_path)
    assert run([*ONNX, str(previous)]) == 130
    assert "interrupted by SIGINT" in last_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_concurrent_run_on_the_same_out_is_refused(previous, tmp_path, capsys):
    with output_lock(previous):
        before = snapshot(tmp_path)
        assert run([*ONNX, str(previous)]) == 2
        line = last_line(capsys.readouterr().err)
        assert snapshot(tmp_path) == before
    assert line == (f"error: {previous} is being written by another pi05-export run (pid {os.getpid()}) "
                    "(hint: wait for that run to finish, or choose another --out)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file went with the lock


def test_symlinked_out_replaces_its_target_and_keeps_the_link(previous, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(previous, target_is_directory=True)
    old_manifest = (previous / "manifest.json").read_text()
    assert run([*ONNX, str(link)]) == 0
    assert link.is_symlink() and link.resolve() == previous.resolve()
    assert (previous / "manifest.json").read_text() != old_manifest  # the new export is where the link points
    assert (previous / "engines" / "plan.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "out"]


def test_staging_left_by_dead_runs_is_removed(previous, tmp_path):
    for name in ("out.tmp-0badc0de", "out.old-deadbeef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "junk.onnx").write_bytes(b"x")
    (tmp_path / "out.tmp-keepme").mkdir()  # not ours (no 8-hex token): left alone
    assert run([*ONNX, str(previous)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp-keepme"]


def _new_manifest(out: Path, marker: str) -> str:
    data = json.loads((out / "manifest.json").read_text())
    data["extra"] = {"marker": marker}
    return json.dumps(data)


def test_rename_failure_rolls_back_to_the_previous_output(previous, tmp_path, capsys, monkeypatch):
    real, failed = os.replace, []

    def replace(src, dst):
        if Path(dst) == previous and ".tmp-" in Path(src).name and not failed:
            failed.append(src)
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    before = snapshot(tmp_path)
    assert run([*ONNX, str(previous)]) == 2
    assert last_line(capsys.readouterr().err) == (f"error: cannot move the new output into {previous}: No space left on device "
                                                  "(hint: the previous output is unchanged; fix the file system problem and re-run)")
    assert failed and snapshot(tmp_path) == before  # engines/ moved back in, staging removed


def test_rename_failure_without_roll_back_is_finished_by_the_next_run(previous, tmp_path, capsys, monkeypatch):
    real = os.replace

    def replace(src, dst):
        if Path(dst) == previous:
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Exception, match="cannot move the new output"), staging_dir(previous, stage="onnx", keep=("engines",)) as tmp:
        shutil.copytree(previous / "onnx", tmp / "onnx")
        (tmp / "manifest.json").write_text(_new_manifest(previous, "new"))
    monkeypatch.setattr(os, "replace", real)
    assert not previous.exists() and (tmp_path / "out.swap").is_file()  # the window the journal covers
    assert Manifest.read(previous).extra == {"marker": "new"}  # the next reader finishes the swap
    assert (previous / "engines" / "plan.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from pi05_export.artifacts import staging_dir
    out, when, manifest = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    real = os.replace
    def replace(src, dst):  # SIGKILL at a chosen point of the commit: no handler, no cleanup runs
        moving_out_aside = Path(src) == out and ".old-" in Path(dst).name
        if moving_out_aside and when == "keep-moved":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
        if moving_out_aside and when == "between-renames":
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    with staging_dir(out, stage="onnx", keep=("engines",)) as tmp:
        shutil.copytree(out / "onnx", tmp / "onnx")
        (tmp / "manifest.json").write_text(manifest)
""")


@pytest.mark.parametrize("when", ["keep-moved", "between-renames"])
def test_kill_during_the_commit_is_finished_by_the_next_run(previous, tmp_path, when):
    proc = subprocess.run([sys.executable, "-c", KILLER, str(previous), when, _new_manifest(previous, "new")],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "out.swap").is_file() and any(p.name.startswith("out.tmp-") for p in tmp_path.iterdir())
    if when == "between-renames":  # the previous output is only under out.old-*: --out is gone
        assert not previous.exists()
        assert Manifest.read(previous).extra == {"marker": "new"}  # the next reader finishes the swap
    else:  # engines/ already moved into the staged output
        assert not (previous / "engines").exists()
    assert run([*ONNX, str(previous)]) == 0  # the next writer finishes (or finds finished) the swap, then replaces it
    assert (previous / "engines" / "plan.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_to_a_real_cli_process(previous, tmp_path):
    """The whole path in a child process: SIGTERM during the export -> exit 143, one line, nothing left."""
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "pi05_export", "onnx", "--preset", "tiny", "--random-init", "--out", str(previous)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith("out.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert last_line(err).startswith("error: interrupted by SIGTERM; no partial output was left")
    assert snapshot(tmp_path) == before


def test_signal_inside_the_commit_is_delivered_after_it(previous, tmp_path, capsys, monkeypatch):
    """SIGTERM while the renames run: the commit is never cut in half; the signal ends the run right after it."""
    real, sent = os.replace, []

    def replace(src, dst):
        if Path(src) == previous and not sent:  # moving the previous output aside
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    old_manifest = (previous / "manifest.json").read_text()
    assert run([*ONNX, str(previous)]) == 143
    assert "interrupted by SIGTERM" in last_line(capsys.readouterr().err)
    assert sent and (previous / "manifest.json").read_text() != old_manifest  # the new output, whole
    assert (previous / "engines" / "plan.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_left_only_as_old_copy_is_restored(previous, tmp_path, pristine):
    """A run of an earlier version killed between its two renames (no journal): the previous output comes back."""
    previous.rename(tmp_path / "out.old-1234abcd")
    (tmp_path / "out.tmp-5678abcd").mkdir()  # its half-written staging
    assert Manifest.read(previous).components.keys() == {"projections"}
    assert (previous / "manifest.json").read_text() == (pristine / "manifest.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
