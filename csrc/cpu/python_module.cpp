// The extension as a Python module: supsup_fast._C when setup.py builds it, supsup_fast_cpu when it is
// compiled on first use (TORCH_EXTENSION_NAME names it either way). Loading it runs bindings.cpp's
// TORCH_LIBRARY registrations. It also holds the small-batch linear ops as plain Python functions,
// for the most common call, eager inference of a layer on 1-16 rows: a torch.ops call goes through
// the boxed dispatcher and its autograd fallback, and the Python that decides whether the call may
// skip the public op's checks costs several µs once a large layer's stream of W has evicted the
// interpreter's caches (benchmarks/call_overhead.py). Here both are a few C++ branches.
//
// direct_masked_linear(x, weight, mask_words, bias) and
// direct_signed_masked_linear(x, sign_words, mask_words, scale, bias) return the op's output, or None
// where the call is not theirs to take: an argument that is not a plain dense CPU tensor (a subclass,
// a functorch wrapper, a meta, sparse or conjugate tensor), a Python dispatch mode in force (opcheck,
// FakeTensorMode) or torch.jit.trace under way, a gradient to record, x not float32 with 1-16 rows, or anything the op itself
// refuses. The caller then takes the public op's general path, which says what is wrong.
#include <Python.h>

#include <algorithm>

#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include "small_ops.h"

namespace supsup_cpu {
namespace {

// The dispatch keys of a plain dense CPU tensor, made with and without autograd (inference mode).
bool plain_cpu_keys(c10::DispatchKeySet keys) {
  static const c10::DispatchKeySet with_autograd = at::empty({0}).key_set();
  static const c10::DispatchKeySet inference = [] {
    c10::InferenceMode guard;
    return at::empty({0}).key_set();
  }();
  return keys == with_autograd || keys == inference;
}

// The tensor behind a plain eager argument (torch.Tensor or nn.Parameter, nothing wrapped, no
// gradient to record), else nullptr.
const at::Tensor* plain_tensor(PyObject* obj, bool grad_enabled) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!plain_cpu_keys(t.key_set()) || (grad_enabled && t.requires_grad())) return nullptr;
  return &t;
}

// x of a small-batch call: float32, [n] or [B, n] with 1 <= B <= 16.
bool small_batch_x(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat && (x.dim() == 1 || (x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 16));
}

// Runs op() without the GIL (the kernels may take a while and use their own threads); its output,
// or an undefined tensor where it throws (a call the op refuses).
template <class Op>
at::Tensor run_without_gil(const char* name, Op op) {
  PyThreadState* state = PyEval_SaveThread();
  at::Tensor y;
  try {
    RECORD_FUNCTION(name, std::vector<c10::IValue>());
    y = op();
  } catch (const std::exception&) {
    y = at::Tensor();
  }
  PyEval_RestoreThread(state);
  return y;
}

PyObject* wrap_or_none(at::Tensor&& y) {
  if (!y.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(y));
}

// The first ``count`` arguments as plain tensors, and the bias (None or a plain tensor): false where
// the call is not the direct path's to take.
bool unpack_args(PyObject* const* args, Py_ssize_t count, const at::Tensor** out, PyObject* bias_obj,
                 std::optional<at::Tensor>& bias) {
  // A dispatch mode, or torch.jit.trace (which records only what goes through the dispatcher)
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0 || torch::jit::tracer::isTracing()) return false;
  const bool grad = c10::GradMode::is_enabled();
  for (Py_ssize_t i = 0; i < count; ++i) {
    out[i] = plain_tensor(args[i], grad);
    if (out[i] == nullptr) return false;
  }
  if (bias_obj != Py_None) {
    const at::Tensor* b = plain_tensor(bias_obj, grad);
    if (b == nullptr) return false;
    bias = *b;
  }
  return small_batch_x(*out[0]);
}

PyObject* direct_masked_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_Format(PyExc_TypeError, "direct_masked_linear takes (x, weight, mask_words, bias), got %zd arguments", nargs);
    return nullptr;
  }
  const at::Tensor* t[3];
  std::optional<at::Tensor> bias;
  if (!unpack_args(args, 3, t, args[3], bias)) Py_RETURN_NONE;
  return wrap_or_none(run_without_gil("supsup_cpu::masked_linear_small",
                                      [&] { return masked_linear_small(*t[0], *t[1], *t[2], bias); }));
}

PyObject* direct_signed_masked_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5) {
    PyErr_Format(PyExc_TypeError,
                 "direct_signed_masked_linear takes (x, sign_words, mask_words, scale, bias), got %zd arguments", nargs);
    return nullptr;
  }
  if (!PyFloat_CheckExact(args[3])) Py_RETURN_NONE;  // the general path converts other numbers
  const double scale = PyFloat_AS_DOUBLE(args[3]);
  const at::Tensor* t[3];
  std::optional<at::Tensor> bias;
  if (!unpack_args(args, 3, t, args[4], bias)) Py_RETURN_NONE;
  return wrap_or_none(run_without_gil("supsup_cpu::signed_masked_linear_small",
                                      [&] { return signed_masked_linear_small(*t[0], *t[1], *t[2], scale, bias); }));
}

// A plain eager int32 CPU tensor (any strides) of `dims` dimensions, else nullptr: the copy checks
// below take no part in tracing, fake tensors or dispatch modes.
const at::Tensor* plain_words(PyObject* obj, int64_t min_dims) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0 || !THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!plain_cpu_keys(t.key_set()) || t.scalar_type() != at::kInt || t.dim() < min_dims) return nullptr;
  return &t;
}

// Word (task, row, word) of a bank [k, *lead, W] whose lead dimensions flatten to rows (any strides).
int32_t bank_word(const at::Tensor& bank, int64_t task, int64_t row, int64_t word) {
  const int32_t* p = bank.data_ptr<int32_t>() + task * bank.stride(0) + word * bank.stride(bank.dim() - 1);
  for (int64_t d = bank.dim() - 2; d >= 1; --d) {  // row -> lead indices, last fastest
    p += (row % bank.size(d)) * bank.stride(d);
    row /= bank.size(d);
  }
  return *p;
}

// Bit j (weight j of the row) of task `task`'s row `row` in the bank, and bit b of a copy's word.
uint32_t bank_bit(const at::Tensor& bank, int64_t task, int64_t row, int64_t j) {
  return (static_cast<uint32_t>(bank_word(bank, task, row, j / 32)) >> (j % 32)) & 1u;
}
uint32_t bit_of(int32_t word, int64_t b) { return (static_cast<uint32_t>(word) >> b) & 1u; }

// The (bank, copy) arguments of a copy check as plain int32 CPU tensors of at least min_dims
// dimensions, the copy contiguous; false where they are not (the check then says nothing).
bool bank_and_copy(PyObject* const* args, int64_t min_dims, const at::Tensor*& bank, const at::Tensor*& copy) {
  bank = plain_words(args[0], min_dims);
  copy = plain_words(args[1], min_dims);
  return bank != nullptr && copy != nullptr && copy->is_contiguous();
}

// The samples of a copy check: tasks spread over [0, k), rows and words over [0, R) and [0, W),
// always the first and the last of each (a copy of the bank before a task was appended differs in
// the last task; one of another bank differs almost everywhere).
constexpr int kSamples = 9;
int64_t spread(int s, int64_t size) { return size <= 1 ? 0 : (s == kSamples - 1 ? size - 1 : (s * 7919) % size); }
// The last task, where a copy made before it was appended differs only in its bits, gets many more
// samples: a sparse mask (1 % of bits set) has a word of 32 bits zero with probability 0.72, so 64
// words miss it with probability about 1e-9, and 512 single bits about 0.6 %.
constexpr int kLastTaskWords = 64, kLastTaskBits = 512;
int64_t scatter(int s, int64_t size) { return size <= 1 ? 0 : (static_cast<int64_t>(s) * 2654435761LL) % size; }

// bank_t == interleave_tasks(bank) at sampled words: bank_t [*lead, W, kp] holds word (i, r, w) at
// [r, w, i] and zeros in the lanes i >= k. True/False, or None where the arguments are not plain
// int32 CPU tensors of the shapes the op checked (then nothing is said).
PyObject* interleaved_copy_matches(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "interleaved_copy_matches takes (bank, bank_t), got %zd arguments", nargs);
    return nullptr;
  }
  const at::Tensor *bank, *copy;
  if (!bank_and_copy(args, 2, bank, copy)) Py_RETURN_NONE;
  const int64_t k = bank->size(0), W = bank->size(-1), kp = copy->size(-1);
  const int64_t R = bank->numel() / std::max<int64_t>(1, k * W);
  if (copy->numel() != R * W * kp || kp < k || k == 0 || W == 0 || R == 0) Py_RETURN_NONE;
  const int32_t* t = copy->data_ptr<int32_t>();
  for (int s = 0; s < kSamples; ++s) {
    const int64_t i = spread(s, k), r = spread((s + 3) % kSamples, R), w = spread((s + 5) % kSamples, W);
    if (t[(r * W + w) * kp + i] != bank_word(*bank, i, r, w)) Py_RETURN_FALSE;
    if (k < kp && t[(r * W + w) * kp + k + spread(s, kp - k)] != 0) Py_RETURN_FALSE;
  }
  for (int s = 0; s < kLastTaskWords; ++s) {
    const int64_t at = scatter(s, R * W), r = at / W, w = at % W;
    if (t[at * kp + k - 1] != bank_word(*bank, k - 1, r, w)) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// bank_w == interleave_weights(bank, n) at sampled bits: bank_w [*lead, ceil(k/32), np] holds task i's
// bit of weight j (row r) in word [r, i/32, j], bit i%32; zeros past k and past n. As above.
PyObject* weight_copy_matches(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyLong_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "weight_copy_matches takes (bank, bank_w, n: int)");
    return nullptr;
  }
  const int64_t n = PyLong_AsLongLong(args[2]);
  const at::Tensor *bank, *copy;
  if (!bank_and_copy(args, 2, bank, copy) || n <= 0) Py_RETURN_NONE;
  const int64_t k = bank->size(0), W = bank->size(-1), groups = (k + 31) / 32, np = copy->size(-1);
  const int64_t R = bank->numel() / std::max<int64_t>(1, k * W);
  if (k == 0 || R == 0 || W * 32 < n || np < n || copy->numel() != R * groups * np) Py_RETURN_NONE;
  const int32_t* t = copy->data_ptr<int32_t>();
  for (int s = 0; s < kSamples; ++s) {
    const int64_t i = spread(s, k), r = spread((s + 3) % kSamples, R), j = spread((s + 5) % kSamples, n);
    if (bit_of(t[(r * groups + i / 32) * np + j], i % 32) != bank_bit(*bank, i, r, j)) Py_RETURN_FALSE;
    if (k % 32 != 0 && (static_cast<uint32_t>(t[(r * groups + groups - 1) * np + j]) >> (k % 32)) != 0) Py_RETURN_FALSE;
    if (n < np && t[(r * groups + i / 32) * np + n + spread(s, np - n)] != 0) Py_RETURN_FALSE;
  }
  const int64_t last = k - 1;
  for (int s = 0; s < kLastTaskBits; ++s) {
    const int64_t at = scatter(s, R * n), r = at / n, j = at % n;
    if (bit_of(t[(r * groups + last / 32) * np + j], last % 32) != bank_bit(*bank, last, r, j)) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// copy == interleave_tasks(transpose_masks(bank, n)) at sampled bits: bank [k, out, W], copy
// [n, ceil(out/32), kp] holds task i's bit of (output o, input j) in word [j, o/32, i], bit o%32.
PyObject* transposed_copy_matches(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "transposed_copy_matches takes (bank, copy), got %zd arguments", nargs);
    return nullptr;
  }
  const at::Tensor *bank, *copy;
  if (!bank_and_copy(args, 3, bank, copy) || bank->dim() != 3 || copy->dim() != 3) Py_RETURN_NONE;
  const int64_t k = bank->size(0), out = bank->size(1), W = bank->size(2);
  const int64_t n = copy->size(0), OW = copy->size(1), kp = copy->size(2);
  if (k == 0 || out == 0 || n == 0 || OW != (out + 31) / 32 || kp < k || W * 32 < n) Py_RETURN_NONE;
  const int32_t* t = copy->data_ptr<int32_t>();
  for (int s = 0; s < kSamples; ++s) {
    const int64_t i = spread(s, k), o = spread((s + 3) % kSamples, out), j = spread((s + 5) % kSamples, n);
    if (bit_of(t[(j * OW + o / 32) * kp + i], o % 32) != bank_bit(*bank, i, o, j)) Py_RETURN_FALSE;
    if (k < kp && t[(j * OW + o / 32) * kp + k + spread(s, kp - k)] != 0) Py_RETURN_FALSE;
  }
  for (int s = 0; s < kLastTaskBits; ++s) {
    const int64_t at = scatter(s, out * n), o = at / n, j = at % n;
    if (bit_of(t[(j * OW + o / 32) * kp + k - 1], o % 32) != bank_bit(*bank, k - 1, o, j)) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"transposed_copy_matches", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&transposed_copy_matches)),
     METH_FASTCALL, "whether copy equals interleave_tasks(transpose_masks(bank, n)) at sampled bits (None: not a plain CPU call)"},
    {"interleaved_copy_matches", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&interleaved_copy_matches)),
     METH_FASTCALL, "whether bank_t equals interleave_tasks(bank) at sampled words (None: not a plain CPU call)"},
    {"weight_copy_matches", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&weight_copy_matches)),
     METH_FASTCALL, "whether bank_w equals interleave_weights(bank, n) at sampled bits (None: not a plain CPU call)"},
    {"direct_masked_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&direct_masked_linear)),
     METH_FASTCALL, "masked_linear_small for a plain eager call, else None"},
    {"direct_signed_masked_linear",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&direct_signed_masked_linear)), METH_FASTCALL,
     "signed_masked_linear_small for a plain eager call, else None"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace supsup_cpu

#define SUPSUP_CONCAT_(a, b) a##b
#define SUPSUP_CONCAT(a, b) SUPSUP_CONCAT_(a, b)
#define SUPSUP_STRINGIFY_(a) #a
#define SUPSUP_STRINGIFY(a) SUPSUP_STRINGIFY_(a)

extern "C" PyObject* SUPSUP_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, SUPSUP_STRINGIFY(TORCH_EXTENSION_NAME),
                                      "supsup_fast CPU kernels (torch.ops.supsup_cpu)", -1, supsup_cpu::methods};
  return PyModule_Create(&module);
}
