"""Artifacts between stages: atomic writes, staged directories, hashes and the manifest.

Every stage builds its output in ``<out>.tmp-<uuid>/`` next to the destination and renames it into
place only when everything succeeded, so a failed run never leaves a partial artifact and never
destroys a good one. ``manifest.json`` is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pi05_export import __version__
from pi05_export.errors import ArtifactError, Pi05ExportError, path_error

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


def resolve_inside(base: str | Path, name: object, what: str, *, error: type[Pi05ExportError] = ArtifactError,
                   hub_links: bool = False) -> Path:
    """``base / name`` for a ``name`` read from a file (manifest, recipe, shard index, processor config).

    Refused with ``error`` (one line, exit 2) when ``name`` is not a non-empty relative string, is
    absolute, climbs out with ``..``, or resolves outside ``base`` once symlinks are followed. With
    ``hub_links`` only the directories on the way must stay inside: Hugging Face hub snapshots link every
    file into ``../../blobs``, so there the final file may be a link out. ``what`` names the file and
    field for the message, e.g. ``"manifest.json component 'llm'"``.
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
    target = (path.parent if hub_links else path).resolve()
    if target != root and root not in target.parents:
        raise error(f"{what} names {name!r}, which leads outside {base} through a symlink", hint=hint)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create output directory {parent}: {e.strerror}", hint="choose a writable --out") from None
    if not os.access(parent, os.W_OK):
        raise ArtifactError(f"output directory {parent} is not writable", hint="choose a writable --out")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a directory", hint="choose another --out")


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
    """
    out = Path(out).absolute()
    _check_writable_parent(out)
    if out.is_dir() and any(out.iterdir()) and not _written_by(out / marker, marker_keys, stage):
        what = f"`pi05-export {stage}`" if stage else "this stage"
        raise ArtifactError(
            f"refusing to replace {out}: it is not empty and was not written by {what}",
            hint="choose a new or empty output directory",
        )
    token = uuid.uuid4().hex[:8]
    tmp = out.with_name(f"{out.name}.tmp-{token}")
    old = out.with_name(f"{out.name}.old-{token}")
    tmp.mkdir()
    moved: list[str] = []
    try:
        yield tmp
        if out.exists():
            for name in keep:
                if (out / name).exists() and not (tmp / name).exists():
                    os.replace(out / name, tmp / name)
                    moved.append(name)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        for name in moved:
            if (tmp / name).exists() and out.is_dir():
                os.replace(tmp / name, out / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _written_by(marker: Path, keys: tuple[str, ...], stage: str | None) -> bool:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or not all(k in data for k in keys):
        return False
    return stage is None or data.get("stage") == stage


def sha256_graph(path: str | Path) -> str:
    """sha256 over an ONNX file and its external-data file (the weights), so any weight change shows."""
    path = Path(path)
    h = hashlib.sha256(sha256_file(path).encode())
    data = path.with_name(path.name + ".data")
    if data.exists():
        h.update(sha256_file(data).encode())
    return h.hexdigest()


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
        if not path.is_file():
            raise ArtifactError(f"no {MANIFEST_NAME} in {directory}", hint=hint)
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{path} is not a valid pi05-export manifest ({e})", hint=hint) from None
        for name, types in _MANIFEST_TYPES.items():  # JSON gives any type: check each field before use
            value = getattr(manifest, name)
            if not isinstance(value, types) or isinstance(value, bool) and int in types:
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ArtifactError(f"{path}: field {name!r} is {type(value).__name__} {value!r:.60}, expected {want}", hint=hint)
        bad = next((k for k, v in manifest.components.items() if not isinstance(v, dict)), None)
        if bad is not None:
            raise ArtifactError(f"{path}: component {bad!r} is not a mapping", hint=hint)
        if manifest.schema_version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{path} has schema version {manifest.schema_version}, this tool reads {SCHEMA_VERSION}",
                hint="re-run the stage that wrote it with this version of pi05-export",
            )
        if stage is not None and manifest.stage != stage:
            raise ArtifactError(f"{path} was written by stage {manifest.stage!r}, expected {stage!r}", hint=hint)
        return manifest

    def component_path(self, directory: str | Path, name: str) -> Path:
        if name not in self.components:
            raise ArtifactError(
                f"component {name!r} is not in {Path(directory) / MANIFEST_NAME} (has: {', '.join(self.components)})",
                hint=f"re-export with --components including {name}",
            )
        entry = self.components[name]
        rel = entry.get("path") if isinstance(entry, dict) else None
        path = resolve_inside(directory, rel, f"{Path(directory) / MANIFEST_NAME} component {name!r}")
        if not path.is_file():
            raise ArtifactError(f"{path} listed in the manifest is missing", hint="re-run the export")
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
        raise ArtifactError(f"{path} is not a readable ONNX graph ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})",
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
