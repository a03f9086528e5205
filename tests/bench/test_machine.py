"""The machine a benchmark or run names: the CPU's identity parsed from /proc/cpuinfo text, and the record built on it."""
from supsup_fast.machine import cpu_identity, cpu_label, read_cpu_identity

ZEN5_VM = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 avx512f avx512bw

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: not the first processor
"""


def _cpuinfo(vendor: str, family: int, model: int, name: str, flags: str) -> str:
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
            f"model name\t: {name}\nflags\t\t: {flags}\n")


def test_zen5_is_named_from_its_family_and_only_the_first_processor_counts():
    info = cpu_identity(ZEN5_VM)
    assert info == {"cpu_model": "AMD EPYC", "cpu_vendor_id": "AuthenticAMD", "cpu_family": 26,
                    "cpu_model_number": 2, "microarchitecture": "Zen 5"}
    assert cpu_label(info) == "AMD EPYC (Zen 5)"


def test_family_19h_is_zen4_with_avx512_and_zen3_without():
    zen4 = cpu_identity(_cpuinfo("AuthenticAMD", 25, 17, "AMD EPYC 9454", "fpu avx2 avx512f avx512vl"))
    zen3 = cpu_identity(_cpuinfo("AuthenticAMD", 25, 1, "AMD EPYC 7763", "fpu avx2 fma"))
    assert zen4["microarchitecture"] == "Zen 4"
    assert zen3["microarchitecture"] == "Zen 3"


def test_intel_and_unknown_amd_families_get_no_generation():
    xeon = cpu_identity(_cpuinfo("GenuineIntel", 6, 207, "Intel(R) Xeon(R) Platinum 8581C", "avx512f"))
    assert xeon["cpu_family"] == 6 and xeon["cpu_model_number"] == 207
    assert "microarchitecture" not in xeon
    assert cpu_label(xeon) == "Intel(R) Xeon(R) Platinum 8581C"
    assert "microarchitecture" not in cpu_identity(_cpuinfo("AuthenticAMD", 21, 2, "AMD Opteron", "avx"))


def test_arm_cpuinfo_without_family_lines_keeps_what_it_has():
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
    assert cpu_identity(arm) == {}
    assert cpu_label({"processor": "aarch64"}) == "aarch64"
    assert cpu_label({}) == "unknown CPU"


def test_an_unreadable_cpuinfo_gives_nothing_rather_than_an_error(tmp_path):
    assert read_cpu_identity(str(tmp_path / "missing")) == {}
    (tmp_path / "cpuinfo").write_text(ZEN5_VM)
    assert read_cpu_identity(str(tmp_path / "cpuinfo"))["microarchitecture"] == "Zen 5"


def test_benchmark_and_run_records_share_one_host_record_with_the_same_key_names():
    import torch

    from supsup_fast.bench import machine
    from supsup_fast.machine import host_record
    from supsup_fast.ops.backends.cpu import cpu_isa
    from supsup_fast.ops.registry import use_backend
    from supsup_fast.runs.results import machine_info

    host = host_record()
    assert host["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert host["threads"] == torch.get_num_threads() and host["torch"] == torch.__version__
    assert all(host[k] == v for k, v in read_cpu_identity().items())
    with use_backend("cpu"):
        bench_record = machine()
    run_record = machine_info(torch.device("cpu"), "cpu")
    for record in (bench_record, run_record):
        assert {k: record[k] for k in host} == host
        assert record["cpu_isa"] == cpu_isa()
    assert "cpu_isa" not in machine_info(torch.device("cpu"))


def test_a_report_of_the_older_machine_keys_still_prints():
    # cpu-cpu.json and cpu-reference.json were written before torch's ISA was named torch_cpu_capability.
    from supsup_fast.bench.report import report_title
    old = {"cpu_model": "AMD EPYC", "threads": 2, "backend": "cpu", "torch": "2.13.0", "cpu_capability": "AVX512"}
    assert report_title(old).endswith("torch 2.13.0 (AVX512)")
    assert report_title({**old, "torch_cpu_capability": "AVX2"}).endswith("(AVX2)")
