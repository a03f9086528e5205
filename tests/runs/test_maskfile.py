import pytest
import torch

import supsup_fast.nn as snn
from supsup_fast.models import build_model
from supsup_fast.runs.maskfile import MaskFileError, load_masks, load_model, read_mask_file, save_masks, save_model


def trained(name="lenet", k=3, out=100, seed=2):
    model = build_model(name, out, seed=seed)
    for _ in range(k):
        snn.begin_task(model)
        model.train()
        if name == "gemresnet18":
            model(torch.randn(4, 3, 32, 32))  # updates BN stats of the task
        snn.finish_task(model)
    return model


def banks(model):
    return [l.bank.words.clone() for l in snn.supermask_layers(model).values()]


def test_roundtrip_rebuilds_weights_and_masks(tmp_path):
    model = trained()
    save_model(model, tmp_path / "m.safetensors", extra={"note": "x"})
    loaded = load_model(tmp_path / "m.safetensors")
    assert snn.num_tasks(loaded) == 3
    for a, b in zip(snn.supermask_layers(model).values(), snn.supermask_layers(loaded).values()):
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(a.bank.words, b.bank.words)


def test_bn_stats_roundtrip(tmp_path):
    model = trained("gemresnet18", k=2, out=5)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    bns = [m for m in model.modules() if isinstance(m, snn.MultitaskBatchNorm)]
    lbns = [m for m in loaded.modules() if isinstance(m, snn.MultitaskBatchNorm)]
    assert all(torch.equal(a.means.rows, b.means.rows) and torch.equal(a.vars.rows, b.vars.rows) for a, b in zip(bns, lbns))
    assert not torch.equal(bns[0].means.rows[0], torch.zeros_like(bns[0].means.rows[0]))


def test_task_range_files_append_in_order(tmp_path):
    model = trained(k=3)
    for t in range(3):
        save_masks(model, tmp_path / f"t{t}.st", t, t + 1)
    fresh = build_model("lenet", 100, seed=2)
    with pytest.raises(MaskFileError, match="must start at task 0"):
        load_masks(fresh, tmp_path / "t1.st")
    for t in range(3):
        load_masks(fresh, tmp_path / f"t{t}.st")
    assert all(torch.equal(a, b) for a, b in zip(banks(model), banks(fresh)))


def test_corrupt_file_refused_and_model_untouched(tmp_path):
    model = trained(k=2)
    path = tmp_path / "m.st"
    save_masks(model, path)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    (tmp_path / "bad.st").write_bytes(bytes(blob))
    target = build_model("lenet", 100, seed=2)
    with pytest.raises(MaskFileError, match="checksum"):
        load_masks(target, tmp_path / "bad.st")
    assert snn.num_tasks(target) == 0
    (tmp_path / "trunc.st").write_bytes(bytes(blob[:100]))
    with pytest.raises(MaskFileError, match="corrupt"):
        load_masks(target, tmp_path / "trunc.st")
    with pytest.raises(MaskFileError, match="does not exist"):
        load_masks(target, tmp_path / "none.st")


def test_mismatched_model_refused(tmp_path):
    model = trained(k=1)
    save_masks(model, tmp_path / "m.st")
    with pytest.raises(MaskFileError, match="saved from model"):
        load_masks(build_model("lenet", 100, seed=3), tmp_path / "m.st")
    with pytest.raises(MaskFileError, match="saved from model"):
        load_masks(build_model("fc1024", 100, seed=2), tmp_path / "m.st")


def test_version_and_tamper_checks(tmp_path):
    from safetensors.torch import save_file
    model = trained(k=1)
    save_masks(model, tmp_path / "m.st")
    tensors, meta = read_mask_file(tmp_path / "m.st")
    meta2 = dict(meta, format_version="99")
    save_file(tensors, str(tmp_path / "v.st"), metadata=meta2)
    with pytest.raises(MaskFileError, match="format version 99"):
        load_masks(build_model("lenet", 100, seed=2), tmp_path / "v.st")
    meta3 = dict(meta, num_tasks="2")  # lies about its content, checksum no longer matches
    save_file(tensors, str(tmp_path / "n.st"), metadata=meta3)
    with pytest.raises(MaskFileError, match="checksum"):
        load_masks(build_model("lenet", 100, seed=2), tmp_path / "n.st")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.st"))
    with pytest.raises(MaskFileError, match="not a supsup_fast"):
        load_masks(build_model("lenet", 100, seed=2), tmp_path / "other.st")


def test_weights_mismatch_detected(tmp_path):
    model = trained(k=1)
    save_masks(model, tmp_path / "m.st")
    other = build_model("lenet", 100, seed=2)
    first = next(iter(snn.supermask_layers(other).values()))
    first.weight[0, 0] *= -1  # e.g. another torch random stream
    with pytest.raises(MaskFileError, match="frozen weights"):
        load_masks(other, tmp_path / "m.st")


def test_file_size_is_bits(tmp_path):
    model = trained("fc1024", k=4, out=500)
    save_model(model, tmp_path / "m.st")
    mask_bytes = snn.mask_bytes(model)
    assert mask_bytes == 4 * (1024 * 25 + 1024 * 32 + 500 * 32) * 4
    assert (tmp_path / "m.st").stat().st_size < mask_bytes + 20_000


@pytest.mark.parametrize("name,k,out", [("lenet", 3, 100), ("gemresnet18", 2, 5)])
def test_whole_model_file_written_from_task_checkpoints(tmp_path, name, k, out):
    # A sharded run writes model.safetensors from its checkpoints, never holding the whole bank:
    # the file must equal save_model's of the assembled model, checksum included.
    from safetensors import safe_open

    from supsup_fast.runs.maskfile import save_model_from_files
    model = trained(name, k=k, out=out)
    files = [tmp_path / f"task_{t}.safetensors" for t in range(k)]
    for t, f in enumerate(files):
        save_masks(model, f, t, t + 1)
    save_model(model, tmp_path / "whole.safetensors", extra={"a": 1})
    save_model_from_files(build_model(name, out, seed=2), files, tmp_path / "streamed.safetensors", extra={"a": 1})
    (ta, ma), (tb, mb) = read_mask_file(tmp_path / "whole.safetensors"), read_mask_file(tmp_path / "streamed.safetensors")
    assert ma == mb and ta.keys() == tb.keys()
    assert all(torch.equal(ta[key], tb[key]) for key in ta)
    with safe_open(str(tmp_path / "streamed.safetensors"), framework="pt") as fh:
        assert fh.metadata()["checksum"] == ma["checksum"]
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    loaded = load_model(tmp_path / "streamed.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(banks(model), banks(loaded)))
    # a checkpoint out of order, or from another model, is refused before anything is written
    with pytest.raises(MaskFileError, match="holds tasks \\[1, 2\\) but the model's next task is 0"):
        save_model_from_files(build_model(name, out, seed=2), files[1:], tmp_path / "bad.safetensors")
    with pytest.raises(MaskFileError, match="was saved from model"):
        save_model_from_files(build_model(name, out, seed=3), files, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_whole_model_file_refuses_a_checkpoint_changed_after_it_was_verified(tmp_path, monkeypatch):
    # The checkpoints are read again for the checksum and the write; one replaced in between (an
    # atomic rewrite, or bytes changed in place) must stop the write, not enter the file under a
    # checksum of its new bytes.
    from supsup_fast.runs import maskfile
    model = trained("fc1024", k=2, out=10)
    files = [tmp_path / f"task_{t}.safetensors" for t in range(2)]
    for t, f in enumerate(files):
        save_masks(model, f, t, t + 1)
    verify = maskfile.read_mask_file

    def rewritten_after_last(file):
        result = verify(file)
        if file == files[-1]:
            save_masks(model, files[0], 1, 2)  # task 1's rows where task 0's were verified
        return result

    monkeypatch.setattr(maskfile, "read_mask_file", rewritten_after_last)
    with pytest.raises(MaskFileError, match="task_0.safetensors changed after it was verified"):
        maskfile.save_model_from_files(build_model("fc1024", 10, seed=2), files, tmp_path / "streamed.safetensors")
    assert not (tmp_path / "streamed.safetensors").exists()
    monkeypatch.setattr(maskfile, "read_mask_file", verify)
    for t, f in enumerate(files):  # unchanged files write as before
        save_masks(model, f, t, t + 1)
    maskfile.save_model_from_files(build_model("fc1024", 10, seed=2), files, tmp_path / "streamed.safetensors")
    assert snn.num_tasks(load_model(tmp_path / "streamed.safetensors")) == 2


def test_whole_model_file_from_checkpoints_of_another_bn_dtype(tmp_path):
    # Checkpoints whose BN statistics are float64 (one, or all): the rows enter the file in the
    # model's dtype, as appending them to the model converts them; the file is whole and readable.
    from supsup_fast.runs.maskfile import save_model_from_files
    model = trained("gemresnet18", k=2, out=5)
    files = [tmp_path / f"task_{t}.safetensors" for t in range(2)]
    for t, f in enumerate(files):
        save_masks(model, f, t, t + 1)
    for m in model.modules():
        if isinstance(m, snn.MultitaskBatchNorm):
            m.means.storage, m.vars.storage = m.means.storage.double(), m.vars.storage.double()
    save_masks(model, files[1], 1, 2)
    assert read_mask_file(files[1])[0]["bn_var/" + next(n for n, m in model.named_modules()
                                                        if isinstance(m, snn.MultitaskBatchNorm))].dtype == torch.float64
    save_model_from_files(build_model("gemresnet18", 5, seed=2), files, tmp_path / "streamed.safetensors")
    loaded = load_model(tmp_path / "streamed.safetensors")
    assert snn.num_tasks(loaded) == 2


def test_verify_mask_file_streams_the_checksum_of_read_mask_file(tmp_path):
    from supsup_fast.runs.maskfile import verify_mask_file
    model = trained("gemresnet18", k=3, out=5)
    path = tmp_path / "m.safetensors"
    save_model(model, path, extra={"a": 1})
    _, meta = read_mask_file(path)
    for chunk in (1 << 26, 64, 1):  # whole tensors, a few rows, one row at a time
        assert verify_mask_file(path, chunk_bytes=chunk) == meta
    blob = bytearray(path.read_bytes())
    for at in (len(blob) - 1, len(blob) // 2):
        bad = bytearray(blob)
        bad[at] ^= 1
        path.write_bytes(bytes(bad))
        with pytest.raises(MaskFileError, match="failed its checksum"):
            verify_mask_file(path, chunk_bytes=64)
    path.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(MaskFileError, match="corrupt or not a safetensors file"):
        verify_mask_file(path)


def test_a_mask_file_is_the_same_bytes_from_any_process(tmp_path):
    # safetensors' own writer orders the metadata differently in each process: two runs with the same
    # masks wrote files of different hashes. The package writes its files itself, sorted.
    import subprocess
    import sys
    script = ("import sys, torch, supsup_fast.nn as snn; from supsup_fast.models import build_model; "
              "from supsup_fast.runs.maskfile import save_model; m = build_model('lenet', 10, seed=2); "
              "[(snn.begin_task(m, generator=torch.Generator().manual_seed(t)), snn.finish_task(m)) for t in range(2)]; "
              "save_model(m, sys.argv[1], extra={'b': 2, 'a': [1, 2], 'c': {'y': 1, 'x': 2}})")
    for name in ("one", "two"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True, timeout=300)
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()
    assert snn.num_tasks(load_model(tmp_path / "one")) == 2


def test_write_tensors_refuses_what_a_safetensors_reader_could_not_read(tmp_path):
    from supsup_fast.runs.maskfile import write_tensors
    with pytest.raises(TypeError, match="metadata must map strings to strings, got 'n': int"):
        write_tensors(tmp_path / "a", {"x": torch.zeros(2)}, {"n": 3})
    with pytest.raises(TypeError, match="tensor 'x' is torch.int8"):
        write_tensors(tmp_path / "a", {"x": torch.zeros(2, dtype=torch.int8)}, {})
    assert not (tmp_path / "a").exists()
