"""Artifacts between stages: atomic writes, staged directories, hashes and the manifest.

Every stage builds its output in ``<out>.tmp-<token>/`` next to the destination and renames it into
place only when everything succeeded, so a failed run never leaves a partial artifact and never
destroys a good one. ``manifest.json`` is written last. One run writes ``<out>`` at a time
(``<out>.lock``); the commit is journaled (``<out>.swap``) so that the next run finishes a commit
cut short by a kill. Manifests record every file's size and hashes, checked whenever a component is
opened (:meth:`Manifest.component_path`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pi05_export import __version__
from pi05_export.errors import ArtifactError, Pi05ExportError, first_line, path_error
from pi05_export.signals import check_interrupted, deferred_signals

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORTS_SUBDIR = "reports"  # OUT/reports/: validation reports about the graphs in OUT
LOCK_SUFFIX = ".lock"  # <out>.lock: held by the run writing <out>
SWAP_SUFFIX = ".swap"  # <out>.swap: journal of a commit in progress (see recover_output)


CHECKPOINT_STAGE = "convert"  # the one stage whose output is a checkpoint directory, not an export


def resolve_inside(base: str | Path, name: object, what: str, *, error: type[Pi05ExportError] = ArtifactError) -> Path:
    """``base / name`` for a ``name`` read from a file (manifest, recipe, shard index, processor config).

    Refused with ``error`` (one line, exit 2) when ``name`` is not a non-empty relative string, is
    absolute, climbs out with ``..``, or resolves outside ``base`` once symlinks are followed. One link
    out is allowed, the Hugging Face hub's own layout: inside ``<repo>/snapshots/<revision>/`` every file
    links to ``<repo>/blobs/<hash>``, so a file whose target is a blob of the snapshot ``base`` lies in is
    accepted (its contents are still checked wherever a hash or size is recorded). ``what`` names the
    file and field for the message, e.g. ``"manifest.json component 'llm'"``.
    """
    base = Path(base)
    hint = f"the file must live in {base}"
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{what} has path {name!r}, which is not a relative file name", hint=hint)
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise error(f"{what} names {name!r}, which is outside {base}", hint=hint)
    path = base / rel
    root = base.resolve()
    target = path.resolve()
    if target != root and root not in target.parents and not _hub_blob(root, path, target):
        raise error(f"{what} names {name!r}, which leads outside {base} through a symlink", hint=hint)
    return path


def _hub_blob(root: Path, path: Path, target: Path) -> bool:
    """True when ``path`` (under ``root``) is a Hugging Face hub snapshot file: its directories stay inside
    ``root`` and it resolves to ``<repo>/blobs/<file>`` of the ``<repo>/snapshots/<revision>`` holding ``root``."""
    parent = path.parent.resolve()
    if parent != root and root not in parent.parents:
        return False
    snapshot = next((a for a in (root, *root.parents) if a.parent.name == "snapshots"), None)
    return snapshot is not None and target.parent == snapshot.parent.parent / "blobs"


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


SAMPLE_BLOCK = 1 << 16  # sampled fingerprint: 16 blocks of 64 KiB spread over the file
SAMPLE_BLOCKS = 16


def sampled_sha256(path: str | Path) -> str:
    """sha256 of 16 blocks of 64 KiB at evenly spaced offsets (the whole file when it is at most 1 MiB).

    Milliseconds on a multi-GB file. With the size it catches a truncated, partly copied or swapped file
    (another export's weights differ in every block); it is not a cryptographic check of every byte —
    :func:`sha256_file` is.
    """
    size = os.path.getsize(path)
    if size <= SAMPLE_BLOCK * SAMPLE_BLOCKS:
        return sha256_file(path)
    h = hashlib.sha256()
    step = (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
    with open(path, "rb") as f:
        for i in range(SAMPLE_BLOCKS):
            f.seek(i * step)
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """What a manifest records of one file it lists: ``bytes``, ``sha256`` and ``sampled_sha256``."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path), "sampled_sha256": sampled_sha256(path)}


def verify_files(directory: str | Path, files: object, what: str, *, full: bool = False) -> None:
    """Check files a manifest lists (``{relative path: file_record}``) against the disk.

    Always: each path stays inside ``directory`` (:func:`resolve_inside`), exists, and has its recorded
    size and sampled fingerprint. With ``full``: its whole-file sha256 too. Raises :class:`ArtifactError`
    naming the first file that differs.
    """
    directory = Path(directory)
    if not isinstance(files, dict):
        raise ArtifactError(f"{what} has a malformed 'files' list", hint="re-run the stage that wrote it")
    hint = "the file changed after it was written (copied over, truncated or from another export): re-run the stage that wrote it"
    for rel, record in files.items():
        path = resolve_inside(directory, rel, what)
        if not isinstance(record, dict):
            raise ArtifactError(f"{what} has a malformed entry for {rel!r}", hint="re-run the stage that wrote it")
        if not path.is_file():
            raise ArtifactError(f"{path} listed in {what} is missing", hint="re-run the stage that wrote it")
        size = path.stat().st_size
        if size != record.get("bytes"):
            raise ArtifactError(f"{path} has {size} bytes, {what} recorded {record.get('bytes')}", hint=hint)
        if full:
            if sha256_file(path) != record.get("sha256"):
                raise ArtifactError(f"{path} does not match the sha256 {what} recorded", hint=hint)
        elif sampled_sha256(path) != record.get("sampled_sha256"):
            raise ArtifactError(f"{path} does not match the fingerprint {what} recorded", hint=hint)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path.<uuid>.tmp`` in the same directory, fsync, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise path_error(e, path) or ArtifactError(f"cannot write {path}: {e.strerror or e}",
                                                   hint="choose a writable path with free space") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def _check_writable_parent(out: Path) -> None:
    if not out.name:
        raise ArtifactError(f"--out {out} names no directory (the file system root)", hint="choose a directory such as out/run1")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create output directory {parent}: {e.strerror}", hint="choose a writable --out") from None
    if not os.access(parent, os.W_OK):
        raise ArtifactError(f"output directory {parent} is not writable", hint="choose a writable --out")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a directory", hint="choose another --out")


def _sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold ``<out>.lock`` (``fcntl.flock``, exclusive) for the block: one run writes ``out`` at a time.

    A second run is refused at once with :class:`ArtifactError` naming the holder's pid, never queued.
    The kernel drops the lock when its process dies, so a killed run never blocks the next one; the
    file is removed on release (re-checked by inode after locking, so a racing run never holds a lock
    on an unlinked file).
    """
    lock = _sibling(Path(out), LOCK_SUFFIX)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ArtifactError(f"cannot create lock file {lock}: {e.strerror}",
                                hint=f"{lock.parent} must be writable (for --out: choose a writable directory)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise ArtifactError(f"cannot lock {lock}: {e.strerror} (this file system may not support flock)",
                                    hint="choose an --out on a local file system") from None
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise ArtifactError(f"{out} is being written by another pi05-export run" + (f" (pid {holder})" if holder else ""),
                                hint="wait for that run to finish, or choose another --out") from None
        try:
            st = os.stat(lock)
            current = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _leftovers(out: Path) -> list[Path]:
    """``<out>.tmp-<token>`` / ``<out>.old-<token>`` directories next to ``out`` (staging of earlier runs)."""
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old|del)-[0-9a-f]{8}")
    try:
        return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []


def _swap(out: Path, tmp: Path, old: Path, keep: Iterable[str]) -> None:
    """Move ``keep`` entries of ``out`` into ``tmp``, then ``out`` -> ``old``, ``tmp`` -> ``out``. Each step
    checks the state first, so running it again after an interruption finishes the same swap."""
    if not tmp.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the staged output vanished (was the parent directory replaced meanwhile?)",
                                str(tmp))
    if out.exists():
        for name in keep:
            if (out / name).exists() and not (tmp / name).exists():
                os.replace(out / name, tmp / name)
        os.replace(out, old)
    os.replace(tmp, out)


def recover_output(out: str | Path) -> None:
    """Repair what interrupted runs left next to ``out``; call it holding :func:`output_lock`.

    A ``<out>.swap`` journal means a run was killed while committing a complete output: the swap is
    finished (roll forward). Without a journal, ``out`` missing next to ``<out>.old-*`` (a run of an
    older version killed between its two renames) is rolled back to the newest old copy. Then every
    ``<out>.tmp-*`` / ``<out>.old-*`` left is removed: under the lock no live run owns them.
    """
    out = Path(out)
    journal = _sibling(out, SWAP_SUFFIX)
    if journal.is_file():
        try:
            record = json.loads(journal.read_text())
            token, keep = str(record["token"]), [str(k) for k in record["keep"]]
        except (OSError, ValueError, KeyError, TypeError):
            token, keep = "", []
        if re.fullmatch(r"[0-9a-f]{8}", token):
            tmp, old = _sibling(out, f".tmp-{token}"), _sibling(out, f".old-{token}")
            if tmp.is_dir():
                _swap(out, tmp, old, keep)
                log.warning("finished replacing %s, which an interrupted run had left half done", out)
        journal.unlink(missing_ok=True)
    leftovers = _leftovers(out)
    olds = [p for p in leftovers if ".old-" in p.name[len(out.name):]]
    if not out.exists() and olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, out)
        log.warning("restored %s from %s, left by an interrupted run", out, newest.name)
        leftovers.remove(newest)
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed %s, left by an interrupted run", p)


def _commit(out: Path, tmp: Path, old: Path, token: str, keep: Iterable[str]) -> None:
    """Replace ``out`` by ``tmp``, journaled: a kill at any point is finished by :func:`recover_output`;
    an error rolls back to the previous ``out`` (and raises ArtifactError)."""
    moving = [n for n in keep if out.is_dir() and (out / n).exists() and not (tmp / n).exists()]
    journal = _sibling(out, SWAP_SUFFIX)
    atomic_write(journal, json.dumps({"token": token, "keep": moving, "pid": os.getpid()}))
    try:
        _swap(out, tmp, old, moving)
    except OSError as e:
        reason = e.strerror or str(e)
        try:  # roll back in this process; if that fails too, the journal stays for the next run
            if old.exists() and not out.exists():
                os.replace(old, out)
            for name in moving:
                if (tmp / name).exists() and not (out / name).exists():
                    os.replace(tmp / name, out / name)
        except OSError:
            raise ArtifactError(f"cannot move the new output into {out}: {reason}",
                                hint="the next pi05-export run on this directory finishes the swap") from None
        journal.unlink(missing_ok=True)
        raise ArtifactError(f"cannot move the new output into {out}: {reason}",
                            hint="the previous output is unchanged; fix the file system problem and re-run") from None
    journal.unlink(missing_ok=True)


def _resolve_out(out: str | Path) -> Path:
    """``out`` as an absolute path; a symlink is followed, so the directory it points at is replaced and the link kept."""
    out = Path(out).expanduser().absolute()
    return Path(os.path.realpath(out)) if out.is_symlink() else out


@contextlib.contextmanager
def staging_dir(
    out: str | Path,
    *,
    stage: str | None = None,
    marker: str = MANIFEST_NAME,
    marker_keys: tuple[str, ...] = ("schema_version", "pi05_export", "stage"),
    keep: Iterable[str] = (),
) -> Iterator[Path]:
    """Yield a fresh sibling temp dir; on success it replaces ``out`` whole, on failure it is removed.

    An existing ``out`` is replaced only when it is empty or was written by this same stage: its
    ``marker`` must be JSON holding ``marker_keys`` (and, for manifests, ``"stage": stage``). So
    ``--out`` pointing at a source checkpoint, another stage's output or any other folder is refused,
    never wiped. ``keep`` names entries of the existing ``out`` that move into the new one (downstream
    artifacts a stage does not own); they are moved back if the commit fails.

    The run holds :func:`output_lock` throughout (a concurrent run on ``out`` is refused) and first
    repairs what interrupted runs left (:func:`recover_output`). A symlinked ``out`` is followed: the
    directory it points at is replaced, the link stays. The commit is journaled in ``<out>.swap`` and
    runs with SIGINT/SIGTERM deferred; a signal received earlier, even one whose exception some
    cleanup code swallowed, cancels the commit (:func:`pi05_export.signals.check_interrupted`).
    """
    out = _resolve_out(out)
    _check_writable_parent(out)
    with output_lock(out):
        recover_output(out)
        if out.is_dir() and any(out.iterdir()) and not _written_by(out / marker, marker_keys, stage):
            what = f"`pi05-export {stage}`" if stage else "this stage"
            raise ArtifactError(
                f"refusing to replace {out}: it is not empty and was not written by {what}",
                hint="choose a new or empty output directory",
            )
        token = uuid.uuid4().hex[:8]
        tmp, old = _sibling(out, f".tmp-{token}"), _sibling(out, f".old-{token}")
        tmp.mkdir()
        try:
            yield tmp
            with deferred_signals():
                check_interrupted()
                _commit(out, tmp, old, token, keep)
        finally:
            if not _sibling(out, SWAP_SUFFIX).exists():  # a journal left by a failed roll-back: the next run finishes it
                shutil.rmtree(tmp, ignore_errors=True)
                if old.exists():  # renamed first: a half-deleted copy is never mistaken for one to restore
                    doomed = _sibling(out, f".del-{token}")
                    os.replace(old, doomed)
                    shutil.rmtree(doomed, ignore_errors=True)


def _written_by(marker: Path, keys: tuple[str, ...], stage: str | None) -> bool:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or not all(k in data for k in keys):
        return False
    return stage is None or data.get("stage") == stage


def external_data_path(graph: str | Path) -> Path:
    """Where an ONNX graph ``<name>.onnx`` keeps its weights: ``<name>.onnx.data`` beside it (every graph
    this tool writes uses that name)."""
    graph = Path(graph)
    return graph.with_name(graph.name + ".data")


def sha256_graph(path: str | Path, files: dict[str, dict[str, Any]] | None = None) -> str:
    """sha256 over an ONNX file and its external-data file (the weights), so any weight change shows.
    ``files`` (:func:`graph_files`) supplies the per-file hashes already computed."""
    path = Path(path)
    data = external_data_path(path)
    known = {Path(rel).name: r["sha256"] for rel, r in (files or {}).items()}
    h = hashlib.sha256((known.get(path.name) or sha256_file(path)).encode())
    if data.exists():
        h.update((known.get(data.name) or sha256_file(data)).encode())
    return h.hexdigest()


def graph_files(path: str | Path, subdir: str) -> dict[str, dict[str, Any]]:
    """``{"<subdir>/<name>": file_record}`` for an ONNX file and its external-data file, if any."""
    path = Path(path)
    data = external_data_path(path)
    return {f"{subdir}/{p.name}": file_record(p) for p in (path, data) if p.exists()}


def tool_versions() -> dict[str, str | None]:
    """Versions of every tool that can change an artifact (None when not installed)."""
    from importlib import metadata

    versions: dict[str, str | None] = {"pi05_export": __version__, "python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "nvidia-modelopt", "polygraphy", "tensorrt", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


# JSON types of the manifest's fields (Manifest.read checks them).
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "stage": (str,), "config": (dict,), "source": (dict,), "components": (dict,), "precision": (str,),
    "opset": (int, type(None)), "recipe": (dict, type(None)), "inputs": (dict,), "extra": (dict,), "tools": (dict,),
    "schema_version": (int,), "pi05_export": (str,),
}


@dataclass
class Manifest:
    """The contract between stages, written as ``manifest.json`` (last) in every stage's output."""

    stage: str
    config: dict[str, Any]
    source: dict[str, Any]
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    precision: str = "fp32"
    opset: int | None = None
    recipe: dict[str, Any] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str | None] = field(default_factory=tool_versions)
    schema_version: int = SCHEMA_VERSION
    pi05_export: str = __version__

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def write(self, directory: str | Path) -> Path:
        return atomic_write(Path(directory) / MANIFEST_NAME, self.to_json())

    @classmethod
    def read(cls, directory: str | Path, *, stage: str | None = None, hint: str = "run `pi05-export onnx` first") -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        out = _resolve_out(directory)
        if _sibling(out, SWAP_SUFFIX).exists() or (not path.is_file() and _leftovers(out)):
            with output_lock(out):  # a run was interrupted writing this directory: finish (or undo) it first
                recover_output(out)
        if not path.is_file():
            raise ArtifactError(f"no {MANIFEST_NAME} in {directory}", hint=hint)
        broken = f"delete {directory} (or pick a new --out) and re-run the stage that wrote it"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path} is not readable JSON ({first_line(e)})",
                                hint=broken) from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{path} must hold a JSON object, got {type(data).__name__}", hint=broken)
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if missing := sorted(required - set(data)):
            raise ArtifactError(f"{path} lacks the manifest field(s) {', '.join(missing)}", hint=broken)
        if unknown := sorted(set(data) - fields):
            raise ArtifactError(f"{path} has unknown field(s) {', '.join(unknown)} (a newer pi05-export?)", hint=broken)
        manifest = cls(**data)
        for name, types in _MANIFEST_TYPES.items():  # JSON gives any type: check each field before use
            value = getattr(manifest, name)
            if not isinstance(value, types) or isinstance(value, bool) and int in types:
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ArtifactError(f"{path}: field {name!r} is {type(value).__name__} {value!r:.60}, expected {want}", hint=broken)
        bad = next((k for k, v in manifest.components.items() if not isinstance(v, dict)), None)
        if bad is not None:
            raise ArtifactError(f"{path}: component {bad!r} is not a mapping", hint=broken)
        if manifest.schema_version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{path} has schema version {manifest.schema_version}, this tool reads {SCHEMA_VERSION}",
                hint="re-run the stage that wrote it with this version of pi05-export",
            )
        if stage is not None and manifest.stage != stage:
            raise ArtifactError(f"{path} was written by stage {manifest.stage!r}, expected {stage!r}", hint=hint)
        if stage is None and manifest.stage == CHECKPOINT_STAGE:  # every other reader wants an export directory
            raise ArtifactError(f"{directory} is a checkpoint written by `pi05-export convert`, not an export directory",
                                hint=f"export it first: pi05-export onnx {directory} --out OUT, then pass OUT")
        return manifest

    def component_path(self, directory: str | Path, name: str, *, full_hash: bool = False) -> Path:
        """The file of component ``name`` (a graph or an engine), checked before anyone opens it.

        Its path must stay inside ``directory`` (symlinks followed), and every file the entry lists
        (graph, external data, emulation copy; ``files``) must have its recorded size and sampled
        fingerprint, or with ``full_hash`` its recorded sha256 (:func:`verify_files`). Entries from
        before per-file records are checked by total size only. Raises :class:`ArtifactError`.
        """
        where = f"{Path(directory) / MANIFEST_NAME} component {name!r}"
        if name not in self.components:
            raise ArtifactError(
                f"component {name!r} is not in {Path(directory) / MANIFEST_NAME} (has: {', '.join(self.components)})",
                hint=f"re-export with --components including {name}",
            )
        entry = self.components[name]
        rel = entry.get("path") if isinstance(entry, dict) else None
        path = resolve_inside(directory, rel, where)
        if not path.is_file():
            raise ArtifactError(f"{path} listed in the manifest is missing", hint="re-run the export")
        if "files" in entry:
            if not isinstance(entry["files"], dict) or rel not in entry["files"]:
                raise ArtifactError(f"{where} does not record its own file {rel!r}", hint="re-run the stage that wrote it")
            verify_files(directory, entry["files"], where, full=full_hash)
        elif isinstance(entry.get("bytes"), int):  # manifests written before per-file records
            data = external_data_path(path)
            size = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
            if size != entry["bytes"]:
                raise ArtifactError(f"{path} (with its .data) has {size} bytes, {where} recorded {entry['bytes']}",
                                    hint="re-run the stage that wrote it")
            if full_hash and isinstance(entry.get("sha256"), str):
                if sha256_graph(path) != entry["sha256"]:
                    raise ArtifactError(f"{path} (with its .data) does not match the sha256 {where} recorded",
                                        hint="re-run the stage that wrote it")
            else:
                log.info("%s predates per-file hashes: only its size was checked (re-run the stage to record them)", where)
        else:
            raise ArtifactError(f"{where} records neither the files nor the size of {rel!r}, so it cannot be checked",
                                hint="re-run the stage that wrote it")
        return path


def load_graph(path: str | Path) -> Any:
    """An ONNX ``ModelProto`` (weights left in external data) from ``path``, checked before anything trusts
    it; the one place graphs are read (``onnx.load_external_data_for_model`` loads the weights after).

    The proto must parse and hold a graph, and every tensor stored in external data (``.onnx.data``)
    must point inside the graph's folder (:func:`resolve_inside`) at an existing file long enough for
    its ``offset + length``. Raises
    :class:`ArtifactError` (one line naming the file) for a missing, garbage or truncated ``.onnx``
    and a missing or short ``.onnx.data``, instead of protobuf's ``DecodeError`` or a crash later.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    hint = "re-export it with `pi05-export onnx`; copy an .onnx together with its .onnx.data"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ArtifactError(f"graph {path} is missing", hint=hint) from None
    except OSError as e:
        raise ArtifactError(f"cannot read graph {path}: {e.strerror or e}", hint=hint) from None
    except Exception as e:  # protobuf's DecodeError and friends: garbage or a truncated file
        raise ArtifactError(f"{path} is not a readable ONNX graph ({type(e).__name__}: {first_line(e, 'corrupt')})",
                            hint=hint) from None
    if not model.graph.node or not model.opset_import:
        raise ArtifactError(f"{path} is not an ONNX graph (no nodes or no opset)", hint=hint)
    sizes: dict[Path, int] = {}
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        try:
            info = ExternalDataInfo(tensor)
        except ValueError as e:
            raise ArtifactError(f"{path}: tensor {tensor.name!r} has malformed external data ({e})", hint=hint) from None
        data = resolve_inside(path.parent, info.location, f"{path} tensor {tensor.name!r} external data")
        if data not in sizes:
            if not data.is_file():
                raise ArtifactError(f"{path} keeps its weights in {data}, which is missing", hint=hint)
            sizes[data] = data.stat().st_size
        end = (info.offset or 0) + (info.length or 0)
        if end > sizes[data]:
            raise ArtifactError(f"{data} is truncated: {sizes[data]} bytes, but tensor {tensor.name!r} of {path.name} "
                                f"ends at byte {end}", hint=hint)
    return model


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` raised while a library writes ``path`` into one :class:`ArtifactError` naming it.

    For writers whose errors lose the errno: onnx_ir writes external data with ``numpy.tofile``, which
    reports a full disk as ``OSError('problem writing element ...')``. Errors with a known errno get
    that errno's hint (:func:`pi05_export.errors.path_error`).
    """
    try:
        yield
    except OSError as e:
        raise path_error(e, path) or ArtifactError(f"cannot write {path}: {e}",
                                                   hint="free disk space or choose a writable --out") from None
