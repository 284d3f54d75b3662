"""Checkpoints as one safetensors file, written atomically.

Everything a run needs to continue (model and EMA weights, optimizer state, step, RNG states,
the model config) lives in one ``.safetensors`` file: tensors as tensors, the rest as JSON in
the file's metadata. No pickle, so loading a checkpoint never executes code. The file is
written to a temporary name in the same folder, fsynced and renamed over the target, so a crash
leaves either the old checkpoint or the new one, never a torn file (and no temporary file but
the one the CLI clears from a run folder: ``files.written_atomically``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from .files import written_atomically

META_KEY = "liquiddiff"
FORMAT_VERSION = 1


def _flatten(tree, prefix: str, tensors: dict):
    """Split nested dicts/lists of tensors and plain values into flat tensors + a JSON skeleton."""
    if isinstance(tree, torch.Tensor):
        # A fresh CPU copy: safetensors refuses tensors that share storage.
        tensors[prefix] = tree.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        node = {str(k): _flatten(v, f"{prefix}.{k}", tensors) for k, v in tree.items()}
        if tree and all(isinstance(k, int) for k in tree):
            node["__int_keys__"] = True  # optimizer state is keyed by parameter index
        return node
    if isinstance(tree, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]}
    return tree


def _unflatten(node, tensors: dict):
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__list__" in node:
            return [_unflatten(v, tensors) for v in node["__list__"]]
        int_keys = node.get("__int_keys__", False)
        return {(int(k) if int_keys else k): _unflatten(v, tensors) for k, v in node.items() if k != "__int_keys__"}
    return node


def save(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) to ``path`` atomically."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    metadata = {META_KEY: json.dumps({"format": FORMAT_VERSION, "tree": skeleton})}
    # Serialised here and written by us: safetensors' save_file writes to a temporary file of its
    # own naming (.tmpXXXXXX) first, which a run killed meanwhile would leave behind for good.
    data = serialize(tensors, metadata=metadata)
    tensors.clear()
    with written_atomically(path, durable=True) as tmp:
        tmp.write_bytes(data)
    return path


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save` (tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = (fh.metadata() or {}).get(META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
    if meta is None:
        raise ValueError(f"checkpoint {path} was not written by liquiddiff (no '{META_KEY}' metadata)")
    payload = json.loads(meta)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {payload.get('format')}, expected {FORMAT_VERSION}")
    return _unflatten(payload["tree"], tensors)
