"""Property tests (hypothesis): random settings to the config validator, random and mutated bytes
to the mask-file reader (and metadata tampered with under a recomputed checksum). Every outcome is a
result or a one-line ValueError (MaskFileError or RunDirError), never another exception type and
never a silent acceptance of garbage."""
import dataclasses
import json
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import supsup_fast.nn as snn  # noqa: E402
from supsup_fast.runs import maskfile  # noqa: E402
from supsup_fast.runs.config import RunConfig, make_config  # noqa: E402
from supsup_fast.models import build_model  # noqa: E402
from supsup_fast.runs.maskfile import MaskFileError  # noqa: E402
from supsup_fast.runs.rundir import RunDirError, check_identity  # noqa: E402

FIELD_NAMES = [f.name for f in dataclasses.fields(RunConfig)]
CHOICES = ["GNu", "GG", "NNs", "permuted-mnist", "split-mnist-10", "lenet", "fc1024", "bnnet", "gemresnet18",
           "oneshot", "binary", "hopfield", "entropy", "superfluous", "sgd", "adam", "rmsprop", "none", "cosine",
           "topk", "threshold", "signed_constant", "kaiming_normal", "cpu", "cuda", "reference", "auto", "task"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3000), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(CHOICES), st.text(max_size=6), st.sampled_from(["1e-4", "0", "-1", "nan", "inf", " 7 ", "1.5"]),
    st.lists(st.integers(-2, 12), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
SETTINGS = st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=6)

INT_FIELDS = ("tasks", "epochs", "batch_size", "infer_images", "test_batch_size", "warmup_epochs", "image_size",
              "mask_budget", "nns_check_every", "nns_score_cache", "hop_recovery_trials", "seed")
POSITIVE_FLOATS = ("lr", "hop_recovery_lr")
NON_NEGATIVE_FLOATS = ("weight_decay", "nns_epsilon", "hop_gamma")


def _one_line(exc):
    text = str(exc)
    assert text and "\n" not in text.strip(), repr(text)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(SETTINGS)
def test_config_validator_gives_a_config_or_one_line_value_error(values):
    try:
        cfg = make_config(overrides=values)
    except ValueError as exc:
        _one_line(exc)
        return
    # Accepted: every value has its type and range.
    for name in INT_FIELDS:
        v = getattr(cfg, name)
        assert type(v) is int and (v >= 0 if name == "seed" else v >= 1), (name, v)
    for name in POSITIVE_FLOATS + NON_NEGATIVE_FLOATS + ("log_base",):
        v = getattr(cfg, name)
        assert type(v) is float and math.isfinite(v), (name, v)
    assert all(getattr(cfg, n) > 0 for n in POSITIVE_FLOATS) and all(getattr(cfg, n) >= 0 for n in NON_NEGATIVE_FLOATS)
    assert cfg.log_base > 1
    for name in ("iters", "output_size", "train_subset"):
        v = getattr(cfg, name)
        assert v is None or (type(v) is int and v >= 1), (name, v)
    assert cfg.density is None or 0 < cfg.density <= 1
    assert all(type(p) is int and 1 <= p <= cfg.tasks for p in cfg.eval_at)
    assert cfg.infer_images <= cfg.test_batch_size
    for name in ("download", "transfer", "shard_bank"):
        assert type(getattr(cfg, name)) is bool
    assert dataclasses.replace(cfg).validate() == cfg  # validating again changes nothing


IDENTITY = {"settings_sha256": "s" * 8, "data_sha256": "d" * 8}
EXTRA = {"run_identity": IDENTITY, "accuracy_after_training": [0.5, 0.5], "train_seconds": 1.0,
         "true_tasks_done": 2, "allocator": {}}
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=6)


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    model = build_model("lenet", 20, seed=3)
    for t in range(2):
        snn.begin_task(model, generator=torch.Generator().manual_seed(t))
        snn.finish_task(model)
    path = tmp_path_factory.mktemp("masks") / "model.safetensors"
    maskfile.save_model(model, path, extra=EXTRA)
    return path.read_bytes()


def _read(path):
    try:
        return maskfile.read_mask_file(path), None
    except ValueError as exc:
        assert isinstance(exc, MaskFileError), type(exc)
        _one_line(exc)
        return None, exc


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_with_mask_file_error(tmp_path, data):
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    result, exc = _read(path)
    assert result is None and exc is not None  # random bytes are never a valid mask file
    with pytest.raises(MaskFileError):
        maskfile.load_model(path)


def _retamper(raw: bytes, path, data, inside_extra: bool) -> None:
    """Write to ``path`` the file ``raw`` with a metadata field (``inside_extra``: a field of its
    ``extra``) deleted or replaced, and the checksum recomputed (maskfile.checksum), so the reader's
    checksum passes and the metadata checks behind it are what must refuse it."""
    from safetensors.torch import load, save_file
    path.write_bytes(raw)
    tensors, meta = load(raw), dict(maskfile.read_metadata(path))
    if inside_extra:
        extra = json.loads(meta["extra"])
        sub = data.draw(st.sampled_from(sorted(extra) + ["run_identity", "other"]))
        if data.draw(st.integers(0, 3)) == 0:
            extra.pop(sub, None)
        else:
            extra[sub] = data.draw(JSON)
        meta["extra"] = json.dumps(extra)
    else:
        key = data.draw(st.sampled_from(sorted(k for k in meta if k != "checksum")))
        action = data.draw(st.sampled_from(["delete", "text", "json"]))
        if action == "delete":
            del meta[key]
        else:
            meta[key] = data.draw(st.text(max_size=8)) if action == "text" else json.dumps(data.draw(JSON))
    meta["checksum"] = maskfile.checksum(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def _consume(path):
    """Load ``path`` the way the run drivers do: the model, the identity check, the extra fields."""
    model = maskfile.load_model(path)
    extra = maskfile.parse_metadata(path, maskfile.read_metadata(path))[4]
    check_identity(path, extra, IDENTITY)
    maskfile.require_extra(path, extra, "accuracy_after_training", "train_seconds", "true_tasks_done", "allocator")
    return model


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_mask_files_are_refused_or_unchanged(tmp_path, mask_file, data):
    raw = bytearray(mask_file)
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "metadata", "metadata", "extra", "extra"]))
    path = tmp_path / "mutated.safetensors"
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "splice":
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    if kind in ("metadata", "extra"):
        _retamper(bytes(raw), path, data, inside_extra=kind == "extra")
    else:
        path.write_bytes(bytes(raw))
    try:
        model = _consume(path)
    except ValueError as exc:  # MaskFileError for the file, RunDirError for its run identity
        assert isinstance(exc, (MaskFileError, RunDirError)), type(exc)
        _one_line(exc)
        event(f"{kind}: refused ({type(exc).__name__})")
        return
    event(f"{kind}: accepted")
    # Accepted only if it is the very same model (a byte in padding may change nothing).
    original = tmp_path / "original.safetensors"
    original.write_bytes(mask_file)
    ref = maskfile.load_model(original)
    assert snn.num_tasks(model) == snn.num_tasks(ref)
    for (n1, a), (n2, b) in zip(snn.supermask_layers(model).items(), snn.supermask_layers(ref).items()):
        assert n1 == n2 and torch.equal(a.bank.words, b.bank.words) and torch.equal(a.weight, b.weight)
