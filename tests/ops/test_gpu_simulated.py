"""A GPU machine simulated on the CPU: torch.cuda.is_available() is True and GPU-only `cuda` and
`triton` backends (which refuse CPU tensors, as the real ones do there) rank above `cpu`. Tests that
loop over backends or assume a CPU-only ranking must still pass here; the pre-fix versions of three
of them fail, which is the class of bug this catches before a real GPU run is spent on it."""
import pytest
import torch

import supsup_fast as ss
from supsup_fast.ops import registry
from supsup_fast.ops.backends.reference import ReferenceBackend


class _GpuOnly(ReferenceBackend):
    fast_batched_inference = False

    def __init__(self, name):
        self.name = name
        self.calls = 0

    def supports(self, device):
        return torch.device(device).type == "cuda"

    def threshold_masked_weight(self, scores, weight):
        if scores.device.type != "cuda":  # the real kernels fail on CPU tensors
            raise RuntimeError(f"{self.name}: CPU tensor sent to a GPU kernel")
        self.calls += 1
        return super().threshold_masked_weight(scores, weight)


@pytest.fixture
def gpu_machine(monkeypatch):
    factories = dict(registry._FACTORIES)
    factories["cuda"] = (lambda: _GpuOnly("cuda"), 30)
    factories["triton"] = (lambda: _GpuOnly("triton"), 20)
    instances = {k: v for k, v in registry._INSTANCES.items() if k not in ("cuda", "triton")}
    monkeypatch.setattr(registry, "_FACTORIES", factories)
    monkeypatch.setattr(registry, "_INSTANCES", instances)
    monkeypatch.setattr(registry, "_FAILURES", {})
    monkeypatch.setattr(registry, "_available", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ss.backends.available()[:2] == ["cuda", "triton"]
    yield
    registry._available = None


def test_simulated_machine_ranks_gpu_backends_first(gpu_machine):
    assert ss.backends.available() == ["cuda", "triton", "cpu", "reference"]
    assert ss.backends.backend_for(torch.device("cpu")).name == "cpu"
    assert ss.backends.backend_for(torch.device("cuda")).name == "cuda"
    with ss.use_backend("triton"), pytest.raises(RuntimeError, match="cannot run on device cpu"):
        ss.ops.threshold_masked_weight(torch.randn(3, 4), torch.randn(3, 4))


def test_fixed_backend_tests_pass_on_a_gpu_machine(gpu_machine):
    from tests.ops.test_cpu_backend import test_cpu_backend_builds_and_is_auto_for_cpu
    from tests.nn.test_optim import test_threshold_masked_weight_backends_agree
    from tests.kernels.test_triton import test_auto_never_picks_the_interpreter_for_cpu_tensors
    test_cpu_backend_builds_and_is_auto_for_cpu()
    test_threshold_masked_weight_backends_agree()
    test_auto_never_picks_the_interpreter_for_cpu_tensors()


def test_the_pre_fix_versions_fail_on_a_gpu_machine(gpu_machine):
    # test_cpu_backend's old first line:
    assert ss.backends.available()[0] != "cpu"
    # test_optim's old loop sent CPU tensors to every backend:
    s, w = torch.randn(33, 70), torch.randn(33, 70)
    with pytest.raises(RuntimeError):
        for name in ss.backends.available():
            with ss.use_backend(name):
                ss.ops.threshold_masked_weight(s, w)
    # test_triton's old expectation on a GPU machine: "triton", where the code picks "cuda".
    assert ss.backends.backend_for(torch.device("cuda")).name != "triton"


def test_backend_loops_in_the_suite_use_the_device_helper(gpu_machine):
    from tests.devices import backend_devices
    pairs = backend_devices()
    # The simulated GPU cannot allocate, so GPU backends get no device here; on a real GPU they get cuda.
    assert all(d.type == "cpu" for _, d in pairs) and {n for n, _ in pairs} == {"cpu", "reference"}
