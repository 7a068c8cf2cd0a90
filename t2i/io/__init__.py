"""Checkpoint files: safetensors weights with metadata, pickle-free nested state, atomic writes.

The lowest layer of t2i (the import contract in pyproject.toml): it imports torch, safetensors and t2i.errors,
never another t2i package.
"""

from .safetensors_io import (
    PICKLE_SUFFIXES,
    SCHEMA_VERSION,
    CheckpointMismatchError,
    CorruptFileError,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    check_state_dict,
    file_sha256,
    flatten_state,
    git_revision,
    load_into,
    load_state,
    load_weights,
    named_read_errors,
    read_config,
    read_metadata,
    save_state,
    save_weights,
    unflatten_state,
)
