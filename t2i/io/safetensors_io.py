"""Safe, atomic checkpoint files: safetensors weights with metadata, and pickle-free nested state.

Three rules, each learned from a framework whose checkpoints broke (DALLE2-pytorch pickled whole objects, so a
torch or class rename made old files unloadable):

- weights are plain safetensors with JSON-able metadata (resolved config, schema version, git revision);
- anything else (optimiser, scheduler, EMA, RNG, data position) is a *nested state*: its tensors go to a
  safetensors file under flattened keys and everything else to a JSON file that points at them, so nothing is
  ever unpickled;
- every write goes to a temporary file in the same folder, is fsynced, then renamed over the target, so a crash
  mid-write leaves the previous file intact (rename is atomic on POSIX filesystems).

Pickle files (``.pt``/``.bin``/``.ckpt``) are refused unless the caller passes ``allow_pickle=True``, and even
then are read with ``torch.load(weights_only=True)``, which cannot run arbitrary code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save_bytes
from torch import Tensor, nn

#: version of the layout written here; bump it when key names or metadata fields change meaning
SCHEMA_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
_TENSOR_REF = "__tensor__"


class CheckpointMismatchError(ValueError):
    """Raised when a state dict does not fit a module; the message lists every mismatch at once."""


class CorruptFileError(ValueError):
    """Raised when a file cannot be what it claims to be: truncated, overwritten, or failing its checksum.

    The message names the file, so a caller can fall back to an older copy and say which one it skipped.
    """


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks (a checkpoint can be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def named_read_errors(path: Path) -> Iterator[None]:
    """Turn safetensors' parse errors into one ``CorruptFileError`` that names the file."""
    try:
        yield
    except (CorruptFileError, FileNotFoundError):
        raise
    except Exception as err:  # SafetensorError, OSError, invalid header JSON: all mean "not a readable file"
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "it may be truncated or damaged: use another copy or an older checkpoint"
        ) from None


# -- atomic files ---------------------------------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power cut (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_sibling(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` under an unused hidden ``.tmp`` name, opened for writing. Created with mode 0666
    so the umask applies as for a plain ``open()`` (mkstemp's files are private, 0600, and a rename keeps that)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # another writer drew the same name: draw again
            continue


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; on success fsync it and rename it onto ``path``.

    If the body raises (or the process dies) the target is untouched and the temporary file is removed (or, after
    a hard kill, left behind under a ``.tmp`` name that readers never look at).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_sibling(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# -- weights --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def git_revision(cwd: str | None = None) -> str:
    """The current git commit (with ``-dirty`` if the tree has changes), or "unknown" outside a repository.

    Cached per process: a run records the revision it started from, without two git calls per file written.
    """
    cwd = cwd or str(Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _contiguous_cpu(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in tensors.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"value of {k!r} is a {type(v).__name__}, not a tensor")
        # safetensors refuses tensors that share storage; clone() gives each key its own buffer
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def save_weights(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    *,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` atomically as safetensors; metadata carries the config, schema version and git revision."""
    meta = {"format": "pt", "t2i_schema_version": str(SCHEMA_VERSION), "git_revision": git_revision()}
    if config is not None:
        meta["config"] = json.dumps(config, sort_keys=True)
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, st_save_bytes(_contiguous_cpu(tensors), metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    with named_read_errors(path), safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The resolved run config stored in a weights file, or None if it has none."""
    meta = read_metadata(path)
    return json.loads(meta["config"]) if "config" in meta else None


def _refuse_pickle(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickle file, which can run arbitrary code when loaded; convert it to safetensors, or pass "
            "allow_pickle=True (--allow-pickle on the command line) if you trust it: it is then read with "
            "torch.load(weights_only=True)"
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a flat mapping of tensor names to tensors")
    return dict(obj)


def load_weights(path: str | os.PathLike, *, allow_pickle: bool = False, device: str = "cpu") -> dict[str, Tensor]:
    """Read a weights file; safetensors always, pickle formats only with ``allow_pickle=True``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix in PICKLE_SUFFIXES:
        return {k: v.to(device) for k, v in _refuse_pickle(path, allow_pickle).items()}
    with named_read_errors(path), safe_open(str(path), framework="pt", device=device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)


def check_state_dict(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], *, what: str = "model") -> None:
    """Raise one ``CheckpointMismatchError`` listing every missing key, unexpected key and shape mismatch."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"  {k}: checkpoint {tuple(found[k].shape)} vs {what} {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"the checkpoint does not fit the {what}:"]
    if missing:
        lines.append(f" {len(missing)} missing key(s): " + ", ".join(missing))
    if unexpected:
        lines.append(f" {len(unexpected)} unexpected key(s): " + ", ".join(unexpected))
    if shapes:
        lines.append(f" {len(shapes)} shape mismatch(es):")
        lines.extend(shapes)
    lines.append("check that the model config matches the one stored in the checkpoint (t2i.io.read_config)")
    raise CheckpointMismatchError("\n".join(lines))


def load_into(module: nn.Module, path: str | os.PathLike, *, allow_pickle: bool = False,
              new: Sequence[str] = ()) -> dict[str, str]:  # fmt: skip
    """Load a weights file into ``module`` after checking every name and shape; returns the file's metadata.

    ``new``: submodule or parameter names (``"shape_map_conv"``) that the file may lack, because they were added to
    a trained model (they keep their initialisation); each must name something in ``module``, and the file must hold
    everything else."""
    found = load_weights(path, allow_pickle=allow_pickle)
    expected = module.state_dict()
    fresh: dict[str, Tensor] = {}
    for name in new:
        keys = [k for k in expected if k == name or k.startswith(name + ".")]
        if not keys:
            raise CheckpointMismatchError(f"{name!r} (a new part to keep as initialised) is not in the model")
        fresh.update({k: expected[k] for k in keys if k not in found})
    check_state_dict(expected, {**found, **fresh})
    module.load_state_dict({**found, **fresh}, strict=True)
    return {} if Path(path).suffix in PICKLE_SUFFIXES else read_metadata(path)


# -- nested state (optimiser, scheduler, EMA, RNG, ...) ------------------------------------------------------


def flatten_state(obj: Any, prefix: str = "", tensors: dict[str, Tensor] | None = None) -> tuple[Any, dict]:
    """Split a nested structure into a JSON-able skeleton and a flat ``{key: tensor}`` dict.

    Tensors are replaced by ``{"__tensor__": key}``; dict keys become strings (optimiser states key by int, so
    int keys are tagged and restored). Tuples come back as lists.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, Tensor):
        key = prefix or "_"
        tensors[key] = obj
        return {_TENSOR_REF: key}, tensors
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"state keys must be str or int, got {k!r} at {prefix or '<root>'}")
            sk = f"#int:{k}" if isinstance(k, int) else k
            out[sk], _ = flatten_state(v, f"{prefix}/{k}" if prefix else str(k), tensors)
        return out, tensors
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, f"{prefix}/{i}", tensors)[0] for i, v in enumerate(obj)], tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix or '<root>'}; use tensors, numbers or strings")


def unflatten_state(skeleton: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR_REF}:
            return tensors[skeleton[_TENSOR_REF]]
        return {(int(k[5:]) if k.startswith("#int:") else k): unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_state(path_stem: str | os.PathLike, state: Any, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state`` as ``<stem>.safetensors`` (tensors) + ``<stem>.json`` (the rest), both atomically.

    The JSON file is written last and names the schema version, so a reader that finds it knows the tensor file
    beside it is complete.
    """
    stem = Path(path_stem)
    skeleton, tensors = flatten_state(state)
    meta = {
        "format": "pt",
        "t2i_schema_version": str(SCHEMA_VERSION),
        **{k: str(v) for k, v in (metadata or {}).items()},
    }
    atomic_write_bytes(stem.with_suffix(".safetensors"), st_save_bytes(_contiguous_cpu(tensors), metadata=meta))
    doc = {"t2i_schema_version": SCHEMA_VERSION, "state": skeleton}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(doc, indent=1, sort_keys=True))


def load_state(path_stem: str | os.PathLike) -> Any:
    """Inverse of ``save_state``."""
    stem = Path(path_stem)
    file = stem.with_suffix(".json")
    try:
        doc = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{file} is not valid JSON ({err}); it may be truncated or damaged") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), (dict, list)):
        raise CorruptFileError(f"{file} is not a t2i state file (no 'state' entry); it may be damaged")
    version = doc.get("t2i_schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{stem}.json has state schema version {version}, this t2i reads version {SCHEMA_VERSION}; "
            "use the t2i release that wrote it, or convert it"
        )
    tensors = load_weights(stem.with_suffix(".safetensors"))
    try:
        return unflatten_state(doc["state"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(
            f"{stem}.json and {stem}.safetensors do not match (missing tensor {err}); the checkpoint is damaged"
        ) from None
