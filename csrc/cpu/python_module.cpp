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

PyMethodDef methods[] = {
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
