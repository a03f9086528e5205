"""Issue #16, files: mask-file and Hopfield-checkpoint metadata tampered with and re-checksummed
(maskfile.checksum) is refused with a MaskFileError or RunDirError saying why, never a raw
AttributeError, KeyError or TypeError."""
import json

import pytest
import torch
from safetensors.torch import save_file

import supsup_fast.nn as snn
from supsup_fast.algorithms.hopsupsup import mask_layers
from supsup_fast.models import build_model
from supsup_fast.runs import maskfile
from supsup_fast.runs.maskfile import MaskFileError
from supsup_fast.runs.rundir import RunDirError, check_identity

IDENTITY = {"settings_sha256": "s" * 64, "data_sha256": "d" * 64}
EXTRA = {"run_identity": IDENTITY, "accuracy_after_training": [0.9, 0.8], "train_seconds": 1.5,
         "true_tasks_done": 2, "allocator": {}}


@pytest.fixture(scope="module")
def mask_path(tmp_path_factory):
    model = build_model("lenet", 20, seed=3)
    for t in range(2):
        snn.begin_task(model, generator=torch.Generator().manual_seed(t))
        snn.finish_task(model)
    path = tmp_path_factory.mktemp("masks") / "model.safetensors"
    maskfile.save_model(model, path, extra=EXTRA)
    return path


def tampered(src, dst, **changes):
    """A copy of ``src`` with metadata fields replaced (None: removed) and the checksum recomputed,
    as someone editing the file on purpose would do."""
    tensors, meta = maskfile.read_mask_file(src)
    meta = dict(meta)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    meta["checksum"] = maskfile.checksum(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def with_extra(src, dst, **changes):
    extra = dict(EXTRA)
    for key, value in changes.items():
        if value is None:
            extra.pop(key, None)
        else:
            extra[key] = value
    return tampered(src, dst, extra=json.dumps(extra))


def loader_extra(path):
    """What the run drivers do first: the verified file's extra."""
    tensors, meta = maskfile.read_mask_file(path)
    return maskfile.parse_metadata(path, meta)[4]


def test_untampered_file_passes_every_check(mask_path):
    extra = loader_extra(mask_path)
    check_identity(mask_path, extra, IDENTITY)
    assert maskfile.require_extra(mask_path, extra, "accuracy_after_training") == [0.9, 0.8]
    assert maskfile.require_extra(mask_path, extra, "true_tasks_done", "train_seconds") == (2, 1.5)
    assert maskfile.require_extra(mask_path, extra, "true_tasks_done", kind=int) == 2
    assert snn.num_tasks(maskfile.load_model(mask_path)) == 2


@pytest.mark.parametrize("identity", ["x", [1, 2], 7, True])
def test_run_identity_that_is_not_an_object_is_a_run_dir_error(mask_path, tmp_path, identity):
    path = with_extra(mask_path, tmp_path / "id.safetensors", run_identity=identity)
    extra = loader_extra(path)  # the file itself is well-formed: the identity check refuses it
    with pytest.raises(RunDirError, match="malformed run identity") as info:
        check_identity(path, extra, IDENTITY)
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)


def test_check_identity_refuses_an_extra_that_is_not_a_dict(tmp_path):
    with pytest.raises(RunDirError, match="carries no run identity"):
        check_identity(tmp_path / "f.safetensors", "x", IDENTITY)


@pytest.mark.parametrize("extra", ['"x"', "[1, 2]", "3", "null", "not json", "{", None])
def test_extra_that_is_not_a_json_object_is_a_mask_file_error(mask_path, tmp_path, extra):
    path = tampered(mask_path, tmp_path / "extra.safetensors", extra=extra)
    with pytest.raises(MaskFileError, match="'extra'"):
        maskfile.load_model(path)
    with pytest.raises(MaskFileError, match="'extra'"):
        loader_extra(path)


@pytest.mark.parametrize("key", ["accuracy_after_training", "train_seconds", "true_tasks_done", "allocator"])
def test_missing_extra_key_is_a_mask_file_error_naming_file_and_key(mask_path, tmp_path, key):
    path = with_extra(mask_path, tmp_path / "missing.safetensors", **{key: None})
    extra = loader_extra(path)
    with pytest.raises(MaskFileError, match=f"lacks the field '{key}'") as info:
        maskfile.require_extra(path, extra, "accuracy_after_training", "train_seconds", "true_tasks_done",
                               "allocator")
    assert str(path) in str(info.value)


def test_require_extra_checks_the_type_when_asked(mask_path, tmp_path):
    path = with_extra(mask_path, tmp_path / "type.safetensors", true_tasks_done="2")
    extra = loader_extra(path)
    with pytest.raises(MaskFileError, match="'true_tasks_done'.*wrong type"):
        maskfile.require_extra(path, extra, "true_tasks_done", kind=int)
    with pytest.raises(MaskFileError, match="wrong type"):  # a bool is not an int here
        maskfile.require_extra(path, {"n": True}, "n", kind=int)
    assert maskfile.require_extra(path, {"a": [1]}, "a", kind=(list, tuple)) == [1]
    with pytest.raises(MaskFileError, match="JSON object"):
        maskfile.require_extra(path, "x", "a")


# -- Hopfield checkpoints ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hop(tmp_path_factory):
    model = build_model("bnnet", 10, seed=1)
    masks = [torch.rand(l.num_features, generator=torch.Generator().manual_seed(i)) < 0.5
             for i, l in enumerate(mask_layers(model))]
    path = tmp_path_factory.mktemp("hop") / "hop.safetensors"
    maskfile.save_hopfield_checkpoint(path, model, [masks], {"tasks_done": 1, "accuracy_after_training": [0.9],
                                                            "train_seconds": 1.0, "run_identity": IDENTITY})
    return path


def hop_tampered(src, dst, tensors_change=None, **changes):
    from safetensors import safe_open
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if tensors_change:
        tensors.update(tensors_change)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    meta["checksum"] = maskfile.checksum(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def hop_extra(**changes):
    extra = {"tasks_done": 1, "accuracy_after_training": [0.9], "train_seconds": 1.0, "run_identity": IDENTITY}
    for key, value in changes.items():
        if value is None:
            extra.pop(key)
        else:
            extra[key] = value
    return json.dumps(extra)


def test_untampered_hopfield_checkpoint_loads(hop):
    extra, true_masks = maskfile.load_hopfield_checkpoint(hop, build_model("bnnet", 10, seed=1), IDENTITY)
    assert extra["tasks_done"] == 1 and len(true_masks) == 1


@pytest.mark.parametrize("extra,message", [
    (hop_extra(tasks_done=None), "lacks the field 'tasks_done'"),
    (hop_extra(tasks_done="1"), "'tasks_done'.*wrong type"),
    (hop_extra(tasks_done=1.0), "'tasks_done'.*wrong type"),
    (hop_extra(tasks_done=True), "'tasks_done'.*wrong type"),
    (hop_extra(tasks_done=-1), "'tasks_done'.*>= 0"),
    (hop_extra(tasks_done=2), "wrong shape"),
    ('"x"', "'extra' must be a JSON object"),
    ("[1]", "'extra' must be a JSON object"),
    ("not json", "malformed metadata field 'extra'"),
    (None, "'extra' is missing"),
])
def test_tampered_hopfield_extra_is_a_mask_file_error(hop, tmp_path, extra, message):
    path = hop_tampered(hop, tmp_path / "hop.safetensors", extra=extra)
    model = build_model("bnnet", 10, seed=1)
    before = [l.hopfield.psi.clone() for l in mask_layers(model)]
    with pytest.raises(MaskFileError, match=message) as info:
        maskfile.load_hopfield_checkpoint(path, model)
    assert str(path) in str(info.value)
    assert all(torch.equal(a, l.hopfield.psi) for a, l in zip(before, mask_layers(model)))  # untouched


def test_hopfield_run_identity_that_is_not_an_object_is_a_run_dir_error(hop, tmp_path):
    path = hop_tampered(hop, tmp_path / "hop.safetensors", extra=hop_extra(run_identity="x"))
    with pytest.raises(RunDirError, match="malformed run identity"):
        maskfile.load_hopfield_checkpoint(path, build_model("bnnet", 10, seed=1), IDENTITY)


def test_hopfield_spec_that_is_not_json_is_a_mask_file_error(hop, tmp_path):
    path = hop_tampered(hop, tmp_path / "hop.safetensors", spec="{not json")
    with pytest.raises(MaskFileError, match="not a Hopfield checkpoint of this model"):
        maskfile.load_hopfield_checkpoint(path, build_model("bnnet", 10, seed=1))


def test_hopfield_pattern_sum_of_the_wrong_shape_is_a_mask_file_error(hop, tmp_path):
    # A [1] pattern sum would broadcast silently into the layer's [d] buffer.
    path = hop_tampered(hop, tmp_path / "hop.safetensors", tensors_change={"pattern_sum/0": torch.ones(1)})
    with pytest.raises(MaskFileError, match="layer 0 tensors are missing or have the wrong shape"):
        maskfile.load_hopfield_checkpoint(path, build_model("bnnet", 10, seed=1))


def retensored(src, dst, change):
    """A copy of ``src`` whose tensors ``change(tensors)`` edits, checksum recomputed."""
    tensors, meta = maskfile.read_mask_file(src)
    tensors = dict(tensors)
    change(tensors)
    meta = dict(meta)
    meta["checksum"] = maskfile.checksum(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_a_huge_model_spec_is_refused_before_any_weight_is_built(mask_path, tmp_path, monkeypatch):
    """A spec whose sizes the file's banks do not back is refused on a model without memory
    (``torch.device('meta')``): before, 10**7 inputs built gigabytes of frozen weights first (10**5
    here: the recorded devices show where the model was built, without the memory)."""
    import supsup_fast.models as models
    built_on = []
    real = models.build_model

    def recording(*args, **kwargs):
        built_on.append(torch.empty(0).device.type)
        return real(*args, **kwargs)
    monkeypatch.setattr(models, "build_model", recording)
    meta = maskfile.read_metadata(mask_path)
    spec, layout = json.loads(meta["model_spec"]), json.loads(meta["layout"])
    spec["input_size"] = 10 ** 5
    huge = tampered(mask_path, tmp_path / "huge.safetensors", model_spec=json.dumps(spec, sort_keys=True))
    with pytest.raises(MaskFileError, match="builds other layer names or shapes than its layout records"):
        maskfile.load_model(huge)
    layout["layers"]["layers.0"]["shape"] = [300, 10 ** 5]  # layout edited to agree: the banks still do not
    both = tampered(mask_path, tmp_path / "both.safetensors", model_spec=json.dumps(spec, sort_keys=True),
                    layout=json.dumps(layout, sort_keys=True))
    with pytest.raises(MaskFileError, match=r"bank of layer layers.0 should be int32 \[2, 300, 3125\]"):
        maskfile.load_model(both)
    assert built_on == ["meta", "meta"]
    maskfile.load_model(mask_path)
    assert built_on == ["meta", "meta", "meta", "cpu"]


def test_a_whole_model_file_of_no_task_is_refused(tmp_path):
    model = build_model("lenet", 20, seed=3)
    maskfile.save_model(model, tmp_path / "empty.safetensors")
    with pytest.raises(MaskFileError, match="holds no task"):
        maskfile.load_model(tmp_path / "empty.safetensors")


def test_bank_pad_bits_and_unknown_tensors_are_refused_at_load(mask_path, tmp_path):
    def pad(t):
        w = t["bank/layers.0"].clone()  # 784 inputs: bits 16..31 of each row's last word are padding
        w[1, 5, -1] |= 1 << 20
        t["bank/layers.0"] = w
    with pytest.raises(MaskFileError, match="has bits set past its 784 inputs"):
        maskfile.load_model(retensored(mask_path, tmp_path / "pad.safetensors", pad))
    with pytest.raises(MaskFileError, match=r"has no place for: \['bank/layers.9'\]"):
        maskfile.load_model(retensored(mask_path, tmp_path / "extra.safetensors",
                                       lambda t: t.update({"bank/layers.9": torch.zeros(2, 3, 1, dtype=torch.int32)})))


@pytest.fixture(scope="module")
def bn_path(tmp_path_factory):
    model = build_model("gemresnet18", 5, seed=1, in_channels=3)
    snn.begin_task(model, generator=torch.Generator().manual_seed(0))
    snn.finish_task(model)
    path = tmp_path_factory.mktemp("bn") / "model.safetensors"
    maskfile.save_model(model, path)
    return path


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update({"bn_var/stem.1": -t["bn_var/stem.1"].abs() - 1}), "holds negative variances"),
    (lambda t: t.update({"bn_mean/stem.1": t["bn_mean/stem.1"].to(torch.int64)}), "should be floating point"),
    (lambda t: t.update({"bn_var/stem.1": t["bn_var/stem.1"] > 0}), "should be floating point"),
])
def test_bn_statistics_of_the_wrong_kind_are_refused(bn_path, tmp_path, change, message):
    with pytest.raises(MaskFileError, match=message):
        maskfile.load_model(retensored(bn_path, tmp_path / "bn.safetensors", change))
    assert maskfile.load_model(bn_path) is not None
