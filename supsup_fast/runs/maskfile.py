"""Mask-bank files: one safetensors file holding, per layer, the packed masks of a range of tasks,
per-task BN statistics, and what is needed to rebuild the frozen weights bit-exactly (the model
spec with its seed, or the weight tensor itself), with a format version and a SHA-256 checksum.

Loading validates everything (checksum, version, model, shapes, task range, rebuilt weights)
before it touches the model: a bad file is refused whole, never half-loaded.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ..algorithms.hopsupsup import mask_layers, store_state
from ..atomic_files import atomic_write_bytes
from ..bits import pad_bits_set
from ..nn import MultitaskBatchNorm, num_tasks, supermask_layers
from .rundir import check_identity

FORMAT = "supsup_fast.maskbank"
FORMAT_VERSION = 1


class MaskFileError(ValueError):
    """A mask-bank file that is corrupt or does not match the model; the message says why."""


def _bn_layers(model: nn.Module) -> Dict[str, MultitaskBatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MultitaskBatchNorm)}


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, layer in supermask_layers(model).items():
        h.update(name.encode())
        h.update(layer.weight.detach().cpu().contiguous().numpy().tobytes())
        if layer.bias is not None:
            h.update(layer.bias.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def bank_digest(model: nn.Module) -> str:
    """SHA-256 of the masks and per-task BN statistics a model holds now (identifies the masks an
    evaluation row was computed from where they have no checkpoint of their own, as under NNs)."""
    h = hashlib.sha256()
    for name, layer in supermask_layers(model).items():
        h.update(name.encode())
        h.update(layer.bank.words.detach().cpu().contiguous().numpy().tobytes())
    for name, bn in _bn_layers(model).items():
        h.update(name.encode())
        for rows in (bn.means.rows, bn.vars.rows):
            h.update(rows.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def checksum(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> str:
    return _digest(metadata, ((name, tensors[name].dtype, tensors[name].shape, [tensors[name].contiguous().numpy().tobytes()])
                              for name in sorted(tensors)))


def _digest(metadata: Dict[str, str], entries) -> str:
    """The checksum of a file: its metadata but the checksum, then each tensor, in name order, as
    ``(name, dtype, shape, pieces of its bytes)`` (whole, or streamed in order)."""
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != "checksum":
            h.update(f"{key}={metadata[key]}\n".encode())
    for name, dtype, shape, pieces in entries:
        h.update(f"{name}:{dtype}:{list(shape)}\n".encode())
        for piece in pieces:
            h.update(piece)
    return h.hexdigest()


def _layout(model: nn.Module) -> Dict[str, dict]:
    return {
        "layers": {n: {"shape": list(m.weight.shape), "init": m.init_kind, "bias": m.bias is not None}
                   for n, m in supermask_layers(model).items()},
        "bn": {n: m.num_features for n, m in _bn_layers(model).items()},
    }


def _metadata(model: nn.Module, first_task: int, count: int, extra: Optional[dict]) -> Dict[str, str]:
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("model has no .spec (build it with supsup_fast.models.build_model); keep another model's "
                         "masks with torch.save(model.state_dict()), which holds them")
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_spec": json.dumps(spec, sort_keys=True),
        "layout": json.dumps(_layout(model), sort_keys=True),
        "first_task": str(first_task),
        "num_tasks": str(count),
        "weights_sha256": weights_digest(model),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }


def save_masks(model: nn.Module, path: Union[str, Path], first_task: int = 0, end_task: Optional[int] = None,
               extra: Optional[dict] = None, label: Optional[int] = None) -> None:
    """Write tasks [first_task, end_task) of ``model`` to ``path`` atomically. ``label``: the task
    index the file records for its first row (default ``first_task``), for a rank whose bank holds
    a task at another row (task-parallel training)."""

    k = num_tasks(model)
    end_task = k if end_task is None else end_task
    if not 0 <= first_task <= end_task <= k:
        raise ValueError(f"task range [{first_task}, {end_task}) is not within the {k} learned tasks")
    metadata = _metadata(model, first_task if label is None else label, end_task - first_task, extra)
    tensors: Dict[str, torch.Tensor] = {}
    for name, layer in supermask_layers(model).items():
        tensors[f"bank/{name}"] = layer.bank.words[first_task:end_task].detach().cpu().contiguous()
        if layer.init_kind == "tensor":
            tensors[f"weight/{name}"] = layer.weight.detach().cpu().contiguous()
        if layer.score_mean is not None and end_task == k:  # Transfer state after the file's last task
            tensors[f"score_mean/{name}"] = layer.score_mean.detach().cpu().contiguous()
    for name, bn in _bn_layers(model).items():
        tensors[f"bn_mean/{name}"] = bn.means.rows[first_task:end_task].detach().cpu().contiguous()
        tensors[f"bn_var/{name}"] = bn.vars.rows[first_task:end_task].detach().cpu().contiguous()
    metadata["checksum"] = checksum(tensors, metadata)
    write_tensors(path, tensors, metadata)


_SAFETENSORS_DTYPES = {torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.uint8: "U8", torch.int64: "I64", torch.bool: "BOOL"}


def _safetensors_header(metadata: Dict[str, str], names: List[str], shapes: dict, dtypes: dict) -> bytes:
    """A safetensors header: the metadata, then the tensors in the order of ``names``, padded to 8 bytes."""
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        size = dtypes[name].itemsize * math.prod(shapes[name])
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtypes[name]], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes


def _write_safetensors(tmp, head: bytes, pieces) -> None:
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for piece in pieces:
            fh.write(piece)


def write_tensors(path: Union[str, Path], tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """``tensors`` and ``metadata`` as a safetensors file, written atomically, its bytes fixed by its
    content (names sorted; safetensors' own writer orders the metadata differently from run to run)."""
    names = sorted(tensors)
    for key, value in metadata.items():  # safetensors' readers take string values only
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map strings to strings, got {key!r}: {type(value).__name__}")
    for n in names:
        if tensors[n].dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {n!r} is {tensors[n].dtype}; the mask files hold {sorted(map(str, _SAFETENSORS_DTYPES))}")
    head = _safetensors_header(metadata, names, {n: tuple(tensors[n].shape) for n in names},
                               {n: tensors[n].dtype for n in names})
    atomic_write_bytes(path, lambda tmp: _write_safetensors(
        tmp, head, (tensors[n].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for n in names)))


def save_model_from_files(model: nn.Module, files: List[Path], path: Union[str, Path],
                          extra: Optional[dict] = None) -> None:
    """The whole-model file of the tasks in ``files`` (one checkpoint per task, in task order),
    written from the checkpoints without holding the bank: each file is verified against
    ``model`` (a fresh model of the run, no tasks) and then read once per tensor, for the checksum
    and for the write; a file that changes after it was verified (its size, time or inode) stops
    the write. The result equals ``save_model`` of the model the files assemble."""
    from safetensors import safe_open

    layers, bns = supermask_layers(model), _bn_layers(model)
    if not files:
        raise ValueError("files must name at least one task checkpoint")
    if num_tasks(model) != 0:
        raise ValueError(f"model must hold no task (its weights and spec only), holds {num_tasks(model)}")
    verified = {}
    for t, file in enumerate(files):  # verified whole, one at a time
        verified[file] = _identity(file)
        tensors, meta = read_mask_file(file)
        if parse_metadata(file, meta)[3] != 1:
            raise MaskFileError(f"{file} holds {meta['num_tasks']} tasks, a task checkpoint holds 1")
        check_mask_file(model, file, tensors, meta, first_task=t)
        last = tensors
    per_task = {f"bank/{n}": (len(files), *l.bank.row_shape) for n, l in layers.items()}
    # each file's rows in the model's own dtype, as appending them to the model converts them
    dtypes = {f"bank/{n}": l.bank.words.dtype for n, l in layers.items()}
    for n, bn in bns.items():
        for kind in ("bn_mean", "bn_var"):
            per_task[f"{kind}/{n}"] = (len(files), *last[f"{kind}/{n}"].shape[1:])
            dtypes[f"{kind}/{n}"] = bn.means.storage.dtype
    whole = {f"weight/{n}": l.weight.detach().cpu().contiguous() for n, l in layers.items() if l.init_kind == "tensor"}
    whole.update({k: v for k, v in last.items() if k.startswith("score_mean/")})  # the state after the last task
    dtypes.update({name: t.dtype for name, t in whole.items()})
    shapes = dict(per_task, **{name: tuple(t.shape) for name, t in whole.items()})

    def pieces(name):  # the tensor's bytes, in order, as a mask file holds them
        if name in whole:
            yield whole[name].numpy().tobytes()
            return
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                if _identity(file) != verified[file]:  # checked with the file open: what is read is what was verified
                    raise MaskFileError(f"{file} changed after it was verified; {path} was not written")
                yield fh.get_tensor(name).to(dtypes[name]).contiguous().numpy().tobytes()

    metadata = _metadata(model, 0, len(files), extra)
    names = sorted(shapes)
    metadata["checksum"] = _digest(metadata, ((name, dtypes[name], shapes[name], pieces(name)) for name in names))
    head = _safetensors_header(metadata, names, shapes, dtypes)
    atomic_write_bytes(path, lambda tmp: _write_safetensors(tmp, head, (p for name in names for p in pieces(name))))


def _identity(path: Path) -> tuple:
    """What tells a rewritten file from the one verified: an atomic replace gives a new inode, an
    in-place write a new modification time."""
    st = Path(path).stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _open(path: Union[str, Path], tensors: bool) -> tuple:
    """(metadata, tensors or None) of a supsup_fast mask file, checked for format and version."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"mask file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            data = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else None
    except Exception as exc:  # safetensors raises its own error types for a damaged header/body
        raise MaskFileError(f"mask file {path} is corrupt or not a safetensors file: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise MaskFileError(f"{path} is not a supsup_fast mask-bank file (format={metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise MaskFileError(f"{path} has format version {metadata.get('format_version')}, this package reads "
                            f"version {FORMAT_VERSION}")
    return metadata, data


def read_mask_file(path: Union[str, Path]) -> tuple:
    """(tensors, metadata) of a verified file; raises MaskFileError if it is corrupt."""
    metadata, tensors = _open(path, tensors=True)
    _check_checksum(path, tensors, metadata)
    return tensors, metadata


def verify_mask_file(path: Union[str, Path], chunk_bytes: int = 1 << 26) -> Dict[str, str]:
    """The metadata of a mask file whose checksum was verified reading its tensors in chunks of about
    ``chunk_bytes``: the file is checked whole without being held (a sharded evaluation holds no
    whole bank). Raises MaskFileError as :func:`read_mask_file` does."""
    from safetensors import safe_open

    metadata = read_metadata(path)

    def entries(fh):
        for name in sorted(fh.keys()):
            part = fh.get_slice(name)
            shape = list(part.get_shape())
            if not shape or shape[0] <= 1:
                chunks = iter([fh.get_tensor(name)])
            else:
                rows = max(1, chunk_bytes // max(1, 4 * math.prod(shape[1:])))
                chunks = (part[i:i + rows] for i in range(0, shape[0], rows))
            first = next(chunks)
            yield name, first.dtype, shape, (c.contiguous().numpy().tobytes() for c in itertools.chain([first], chunks))

    try:
        with safe_open(str(path), framework="pt") as fh:
            digest = _digest(metadata, entries(fh))
    except Exception as exc:  # safetensors raises its own error types for a damaged header/body
        raise MaskFileError(f"mask file {path} is corrupt or not a safetensors file: {exc}") from exc
    _check_digest(path, metadata, digest)
    return metadata


def read_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The metadata of a mask file without reading its tensors (not checksummed: use
    read_mask_file before trusting the tensors)."""
    return _open(path, tensors=False)[0]


def load_masks(model: nn.Module, path: Union[str, Path], first_task: Optional[int] = None) -> dict:
    """Append the tasks stored in ``path`` to ``model``. The file's first task must be
    ``first_task`` (default: the model's next task; a rank holding a shard of the bank passes the
    global index). Returns the file's ``extra`` dict."""
    tensors, meta = read_mask_file(path)
    return apply_mask_file(model, path, tensors, meta, first_task)


def parse_extra(path, meta: Dict[str, str]) -> dict:
    """The ``extra`` dict of a verified file's metadata, or a MaskFileError if it is missing, not
    JSON or not a JSON object (a file whose checksum was recomputed after tampering)."""
    if "extra" not in meta:
        raise MaskFileError(f"{path}: metadata field 'extra' is missing")
    try:
        extra = json.loads(meta["extra"])
    except (ValueError, TypeError) as exc:
        raise MaskFileError(f"{path}: malformed metadata field 'extra' ({exc})") from exc
    if not isinstance(extra, dict):
        raise MaskFileError(f"{path}: metadata field 'extra' must be a JSON object, got {type(extra).__name__}")
    return extra


_MISSING = object()


def require_extra(path, extra: dict, *keys: str, kind=None):
    """``extra[key]`` of a mask file (one key: the value; several: a tuple of values), or a
    MaskFileError naming the file and the key when the key is missing, or when ``kind`` (a type or
    tuple of types, as for isinstance; bool never passes for int) is given and the value is not of it."""
    if not isinstance(extra, dict):
        raise MaskFileError(f"{path}: metadata field 'extra' must be a JSON object, got {type(extra).__name__}")
    if not keys:
        raise TypeError("require_extra needs at least one key")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    values = []
    for key in keys:
        value = extra.get(key, _MISSING)
        if value is _MISSING:
            raise MaskFileError(f"{path}: its metadata 'extra' lacks the field {key!r} (written by another "
                                f"version, or modified)")
        if kind is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise MaskFileError(f"{path}: field {key!r} of its metadata 'extra' has the wrong type "
                                f"({type(value).__name__})")
        values.append(value)
    return values[0] if len(values) == 1 else tuple(values)


def parse_metadata(path, meta: Dict[str, str]) -> tuple:
    """(spec, layout, first_task, num_tasks, extra) of a verified file's metadata, or a
    MaskFileError if a field is missing or malformed (a file whose checksum was recomputed after
    tampering)."""
    try:
        spec, layout = json.loads(meta["model_spec"]), json.loads(meta["layout"])
        first, count = int(meta["first_task"]), int(meta["num_tasks"])
        digest = meta["weights_sha256"]
    except KeyError as exc:
        raise MaskFileError(f"{path}: metadata field {exc.args[0]!r} is missing") from exc
    except (ValueError, TypeError) as exc:
        raise MaskFileError(f"{path}: malformed metadata ({exc})") from exc
    extra = parse_extra(path, meta)
    if not isinstance(spec, dict) or not isinstance(layout, dict):
        raise MaskFileError(f"{path}: model_spec, layout and extra must be JSON objects")
    if first < 0 or count < 0 or not isinstance(digest, str):
        raise MaskFileError(f"{path}: first_task and num_tasks must be >= 0, got {first} and {count}")
    return spec, layout, first, count, extra


def apply_mask_file(model: nn.Module, path, tensors: Dict[str, torch.Tensor], meta: Dict[str, str],
                    first_task: Optional[int] = None) -> dict:
    """Check a verified file (``read_mask_file``) against ``model`` and append its tasks."""
    extra = check_mask_file(model, path, tensors, meta, first_task)
    for n, layer in supermask_layers(model).items():
        layer.append_packed(tensors[f"bank/{n}"])
        if f"score_mean/{n}" in tensors:
            layer.score_mean = tensors[f"score_mean/{n}"].to(layer.weight.device)
    for n, bn in _bn_layers(model).items():
        bn.append_stats(tensors[f"bn_mean/{n}"].to(bn.means.storage.device), tensors[f"bn_var/{n}"].to(bn.means.storage.device))
    return extra


def check_mask_file(model: nn.Module, path, tensors: Dict[str, torch.Tensor], meta: Dict[str, str],
                    first_task: Optional[int] = None) -> dict:
    """Everything ``apply_mask_file`` checks before it appends: the file's model, weights, task
    range (starting at ``first_task``, default the model's next task), shapes, pad bits and
    tensors. Returns its ``extra`` dict."""
    spec, layout, first, count, extra = parse_metadata(path, meta)
    if spec != getattr(model, "spec", None):
        raise MaskFileError(f"{path} was saved from model {spec}, not {getattr(model, 'spec', None)}")
    if layout != _layout(model):
        raise MaskFileError(f"{path} has different layer names or shapes than the model")
    k = num_tasks(model)
    expect = k if first_task is None else first_task
    if first != expect:
        raise MaskFileError(f"{path} holds tasks [{first}, {first + count}) but the model's next task is {expect} "
                            f"(the file must start at task {expect})")
    layers, bns = supermask_layers(model), _bn_layers(model)
    weights = {n: tensors.get(f"weight/{n}") for n, l in layers.items() if l.init_kind == "tensor"}
    for n, w in weights.items():
        if w is None or not torch.equal(w, layers[n].weight.detach().cpu()):
            raise MaskFileError(f"{path}: the stored weight of layer {n} differs from the model's")
    if meta["weights_sha256"] != weights_digest(model):
        raise MaskFileError(f"{path}: the model's frozen weights do not match the ones the masks were trained on "
                            f"(different seed, init or torch random stream)")
    check_bank_shapes(path, layers, tensors, count)
    for n, layer in layers.items():
        if pad_bits_set(tensors[f"bank/{n}"], layer.weight[0].numel()):
            raise MaskFileError(f"{path}: bank of layer {n} has bits set past its {layer.weight[0].numel()} inputs "
                                f"(the padding of each row's last word must be zero)")
    for n, layer in layers.items():
        mean = tensors.get(f"score_mean/{n}")
        if mean is not None and (tuple(mean.shape) != tuple(layer.weight.shape) or not mean.is_floating_point()):
            raise MaskFileError(f"{path}: score_mean of layer {n} should be floating point {list(layer.weight.shape)}, "
                                f"got {mean.dtype} {list(mean.shape)}")
    for n, bn in bns.items():
        for key in ("bn_mean", "bn_var"):
            t = tensors.get(f"{key}/{n}")
            if t is None or tuple(t.shape) != (count, bn.num_features) or not t.is_floating_point():
                raise MaskFileError(f"{path}: {key} of BN layer {n} should be floating point [{count}, {bn.num_features}], "
                                    f"got {None if t is None else (t.dtype, list(t.shape))}")
        if bool((tensors[f"bn_var/{n}"] < 0).any()):
            raise MaskFileError(f"{path}: bn_var of BN layer {n} holds negative variances")
    known = ({f"{kind}/{n}" for n in layers for kind in ("bank", "weight", "score_mean")}
             | {f"{kind}/{n}" for n in bns for kind in ("bn_mean", "bn_var")})
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise MaskFileError(f"{path} holds tensors this model has no place for: {unknown[:5]}"
                            f"{' ...' if len(unknown) > 5 else ''} (a file of another version or model, or modified)")
    return extra


def check_bank_shapes(path, layers: Dict[str, nn.Module], tensors: Dict[str, torch.Tensor], count: int) -> None:
    """Each layer's bank in the file is int32 ``[count, *row_shape]``."""
    for n, layer in layers.items():
        bank = tensors.get(f"bank/{n}")
        expect = (count, *layer.bank.row_shape)
        if bank is None or bank.dtype != torch.int32 or tuple(bank.shape) != expect:
            raise MaskFileError(f"{path}: bank of layer {n} should be int32 {list(expect)}, got "
                                f"{None if bank is None else (bank.dtype, list(bank.shape))}")


def save_model(model: nn.Module, path: Union[str, Path], extra: Optional[dict] = None) -> None:
    """All tasks of ``model`` in one file."""
    save_masks(model, path, 0, None, extra)


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild the model a file was saved from (frozen weights from the seed) and load its masks."""
    from ..models import build_model

    tensors, meta = read_mask_file(path)
    spec, layout, first, count, _ = parse_metadata(path, meta)
    if first != 0:
        raise MaskFileError(f"{path} starts at task {first}; a whole-model file starts at 0")
    if count == 0:
        raise MaskFileError(f"{path} holds no task; a whole-model file holds at least one")
    # The spec's sizes are checked on a model without memory first: a spec that does not match the
    # banks in the file (each at least one task of 1 bit per weight, backed by the file's bytes) is
    # refused before the frozen weights, up to 32 bytes per bank byte of a task, are built.
    try:
        with torch.device("meta"):
            skeleton = build_model(**spec)
    except (TypeError, ValueError) as exc:
        raise MaskFileError(f"{path}: its model_spec {spec} does not describe a model this package builds ({exc})") from exc
    if layout != _layout(skeleton):
        raise MaskFileError(f"{path}: its model_spec builds other layer names or shapes than its layout records")
    check_bank_shapes(path, supermask_layers(skeleton), tensors, count)
    model = build_model(**spec).to(device)
    apply_mask_file(model, path, tensors, meta)
    return model


SCORE_CACHE_FORMAT = "supsup_fast.nns_scores"


def _read_safetensors(path: Union[str, Path]) -> tuple:
    """(metadata, tensors) of a safetensors file, or a MaskFileError naming it."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {}), {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header/body
        raise MaskFileError(f"{path} is corrupt or not a safetensors file: {exc}") from exc


def _check_checksum(path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    _check_digest(path, metadata, checksum(tensors, metadata))


def _check_digest(path, metadata: Dict[str, str], digest: str) -> None:
    if metadata.get("checksum") != digest:
        raise MaskFileError(f"{path} failed its checksum: the file is corrupt or was modified")


def save_score_cache(path: Union[str, Path], cache: List[tuple], extra: dict) -> None:
    """NNs' float scores of recently trained masks (``MaskAllocator.score_cache()``: (mask, {layer:
    scores}) pairs, least recently used first) with ``extra`` and a checksum, written atomically."""
    tensors = {f"scores/{mask}/{name}": s.detach().cpu().contiguous() for mask, scores in cache for name, s in scores.items()}
    meta = {"format": SCORE_CACHE_FORMAT, "order": json.dumps([mask for mask, _ in cache]),
            "extra": json.dumps(extra, sort_keys=True)}
    meta["checksum"] = checksum(tensors, meta)
    write_tensors(path, tensors, meta)


def load_score_cache(path: Union[str, Path]) -> tuple:
    """(cache, extra) of a file of :func:`save_score_cache`, checked for format and checksum."""
    meta, tensors = _read_safetensors(path)
    if meta.get("format") != SCORE_CACHE_FORMAT:
        raise MaskFileError(f"{path} is not an NNs score cache (format {meta.get('format')!r})")
    _check_checksum(path, tensors, meta)
    try:
        order = json.loads(meta["order"])
    except (KeyError, ValueError, TypeError) as exc:
        raise MaskFileError(f"{path}: its metadata 'order' is missing or not JSON") from exc
    if not isinstance(order, list) or not all(isinstance(m, int) and not isinstance(m, bool) for m in order):
        raise MaskFileError(f"{path}: its metadata 'order' must be a list of mask indices, got {order!r}")
    cache = []
    for mask in order:
        prefix = f"scores/{mask}/"
        cache.append((mask, {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}))
    if sum(len(scores) for _, scores in cache) != len(tensors):
        raise MaskFileError(f"{path} holds scores of masks its 'order' does not list")
    return cache, parse_extra(path, meta)


def save_hopfield_checkpoint(path, model, true_masks, extra) -> None:
    """A HopSupSup checkpoint: the Hopfield matrices, the true masks so far (kept only to measure
    recovery) and ``extra``, with a checksum, written atomically."""
    tensors = store_state(model)
    for i in range(len(mask_layers(model))):
        if true_masks:
            tensors[f"true_masks/{i}"] = torch.stack([m[i] for m in true_masks]).to(torch.uint8).cpu().contiguous()
    meta = {"format": "supsup_fast.hopfield", "spec": json.dumps(model.spec, sort_keys=True), "extra": json.dumps(extra)}
    meta["checksum"] = checksum(tensors, meta)
    write_tensors(path, tensors, meta)


def load_hopfield_checkpoint(path, model, identity: Optional[dict] = None):
    """Restore a checkpoint (of the run with ``identity``, checked before anything is changed)."""
    meta, tensors = _read_safetensors(path)
    try:
        spec = json.loads(meta.get("spec", "null"))
    except (ValueError, TypeError):
        spec = None
    if meta.get("format") != "supsup_fast.hopfield" or spec != model.spec:
        raise MaskFileError(f"{path} is not a Hopfield checkpoint of this model ({model.spec})")
    _check_checksum(path, tensors, meta)
    extra = parse_extra(path, meta)
    if identity is not None:
        check_identity(path, extra, identity)
    layers = mask_layers(model)
    done = require_extra(path, extra, "tasks_done", kind=int)
    if done < 0:
        raise MaskFileError(f"{path}: field 'tasks_done' of its metadata 'extra' must be >= 0, got {done}")
    for i, l in enumerate(layers):
        psi, ps = tensors.get(f"psi/{i}"), tensors.get(f"pattern_sum/{i}")
        tm = tensors.get(f"true_masks/{i}")
        if psi is None or tuple(psi.shape) != (l.num_features,) * 2 or ps is None \
                or tuple(ps.shape) != (l.num_features,) or tm is None \
                or tuple(tm.shape) != (done, l.num_features):
            raise MaskFileError(f"{path}: layer {i} tensors are missing or have the wrong shape")
    for i, l in enumerate(layers):
        l.hopfield.psi.copy_(tensors[f"psi/{i}"])
        l.hopfield.pattern_sum.copy_(tensors[f"pattern_sum/{i}"])
        l.hopfield.count = done
    true_masks = [[tensors[f"true_masks/{i}"][t].bool() for i in range(len(layers))] for t in range(done)]
    return extra, true_masks
