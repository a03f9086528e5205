#!/bin/bash
# The portable kernels on a real aarch64 build, run under user-mode emulation (qemu-aarch64) on an
# x86-64 Debian/Ubuntu machine: csrc/cpu is cross-compiled with aarch64-linux-gnu-g++ against
# PyPI's aarch64 torch wheel as supsup_fast._C (GCC vectorises the portable loops for NEON there),
# and the check scripts of tests/ops that run on every ISA level (every kernel against the
# reference backend, odd sizes, every table threshold) run under Debian's arm64 Python 3.11 with it.
# Emulation says nothing about speed. Not part of the pytest run: it needs root for apt (qemu-user,
# g++-aarch64-linux-gnu, the arm64 architecture for Python's packages) and downloads about 130 MB;
# a pass takes about 15 minutes on 2 cores.
#
#   bash tests/arm/run_emulated.sh [WORK_DIR]     (default: ~/.cache/supsup_fast_arm; kept between runs)
#
# Exit status 0 where every script printed its ISA ("scalar") first and "ok" last.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-$HOME/.cache/supsup_fast_arm}
TORCH_VERSION=2.9.1  # PyPI's aarch64 CPU wheel for Python 3.11
mkdir -p "$WORK"
cd "$WORK"

if ! command -v qemu-aarch64 > /dev/null || ! command -v aarch64-linux-gnu-g++ > /dev/null; then
  apt-get install -y --no-install-recommends qemu-user g++-aarch64-linux-gnu
fi

# Debian's arm64 Python 3.11 and the libraries its standard library loads, unpacked into root/.
if [ ! -x root/usr/bin/python3.11 ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64 && apt-get update -qq; }
  mkdir -p debs root
  (cd debs && apt-get download python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
    libpython3.11-dev:arm64 libffi8:arm64 libexpat1:arm64 zlib1g:arm64 libbz2-1.0:arm64 liblzma5:arm64 libssl3:arm64 \
    libuuid1:arm64 libsqlite3-0:arm64 libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 libnsl2:arm64 \
    libtirpc3:arm64 libcrypt1:arm64 libgssapi-krb5-2:arm64 libkrb5-3:arm64 libk5crypto3:arm64 libcom-err2:arm64 \
    libkrb5support0:arm64 libkeyutils1:arm64)
  for d in debs/*.deb; do dpkg-deb -x "$d" root; done
fi

# torch and the package's Python dependencies, aarch64 wheels unpacked into site/.
if [ ! -d site/torch ]; then
  mkdir -p wheels site
  pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_aarch64 \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 -d wheels "torch==$TORCH_VERSION" numpy \
    typing_extensions sympy mpmath networkx jinja2 markupsafe fsspec filelock safetensors tqdm pyyaml
  for w in wheels/*.whl; do python3 -m zipfile -e "$w" site; done
fi

run_arm() {
  env QEMU_LD_PREFIX=/usr/aarch64-linux-gnu qemu-aarch64 \
    -E LD_LIBRARY_PATH="$WORK/root/usr/lib/aarch64-linux-gnu:$WORK/root/lib/aarch64-linux-gnu" \
    -E PYTHONPATH="$WORK/site:$WORK/pkg" -E PYTHONHOME="$WORK/root/usr" -E OMP_NUM_THREADS=2 \
    "$WORK/root/usr/bin/python3.11" "$@"
}

# The package with csrc/cpu cross-compiled as its prebuilt module supsup_fast._C.
rm -rf pkg obj && mkdir -p pkg obj
cp -r "$REPO/supsup_fast" "$REPO/tests" pkg/
cp -r "$REPO/csrc" pkg/supsup_fast/csrc
T=$WORK/site/torch
FLAGS=$(python3 -c "import runpy, sys; print(' '.join(runpy.run_path(sys.argv[1])['CPU_CFLAGS']))" "$REPO/csrc/build.py")
FLAGS="$FLAGS -fPIC -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  -I$T/include -I$T/include/torch/csrc/api/include -I$WORK/root/usr/include/python3.11 -I$WORK/root/usr/include"
echo "cross-compiling csrc/cpu for aarch64"
ls "$REPO"/csrc/cpu/*.cpp | xargs -P 2 -I{} sh -c "aarch64-linux-gnu-g++ $(echo $FLAGS) -c {} -o obj/\$(basename {} .cpp).o"
aarch64-linux-gnu-g++ -shared -fopenmp obj/*.o -L"$T/lib" -ltorch -ltorch_cpu -lc10 -ltorch_python \
  -o pkg/supsup_fast/_C.cpython-311-aarch64-linux-gnu.so

# The check scripts, as the tests run them on each ISA level.
mkdir -p scripts && rm -f scripts/*
(cd "$REPO" && python3 - "$WORK/scripts" <<'EOF'
import importlib, pathlib, sys
out = pathlib.Path(sys.argv[1])
checks = {"test_cpu_backend": ["EVERY_ISA_SCRIPT", "PORTABLE_LAYERS_SCRIPT"], "test_cpu_lut": ["SCRIPT"],
          "test_cpu_interleaved": ["SCRIPT"], "test_cpu_superpose": ["SCRIPT"], "test_cpu_weight_copy": ["SCRIPT"],
          "test_bank_linear": ["ISA_SCRIPT"], "test_cpu_gemv": ["SCRIPT"], "test_cpu_signed_lut": ["SCRIPT"]}
for module, names in checks.items():
    m = importlib.import_module(f"tests.ops.{module}")
    for name in names:
        (out / f"{module}.{name}.py").write_text(getattr(m, name))
EOF
)

run_arm -c "import platform, torch, supsup_fast.ops.backends.cpu as c; print(platform.machine(), torch.__version__, c.load_cpu_extension(), c.cpu_isa())"
failed=0
for s in scripts/*.py; do
  start=$(date +%s)
  if run_arm "$s" > "${s%.py}.log" 2>&1 && [ "$(head -n1 "${s%.py}.log")" = scalar ] && [ "$(tail -n1 "${s%.py}.log")" = ok ]; then
    echo "ok      $(basename "$s") ($(( $(date +%s) - start )) s)"
  else
    echo "FAILED  $(basename "$s"): see ${s%.py}.log"; failed=1
  fi
done
exit $failed
