// Torch bindings of the CUDA kernels: TORCH_LIBRARY(supsup_cuda) + CUDA implementations. Argument
// checks here (TORCH_CHECK names the argument); kernels run on the current CUDA stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels.cuh"

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "supsup_cuda: ", what, " failed: ", cudaGetErrorString(err));
}

void check_bank(const at::Tensor& bank) {
  TORCH_CHECK(bank.is_cuda(), "bank must be a CUDA tensor");
  TORCH_CHECK(bank.scalar_type() == at::kInt, "bank must be int32 packed words, got ", bank.scalar_type());
  TORCH_CHECK(bank.dim() == 2 && bank.is_contiguous(), "bank must be a contiguous [k, L] tensor");
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

// The package never passes `active` (its ops gather the rows first); a direct call that does gets
// its indices checked against the bank's k_all rows (a host sync), so no kernel reads out of bounds.
const int64_t* active_ptr(const c10::optional<at::Tensor>& active, const at::Tensor& bank) {
  if (!active.has_value()) return nullptr;
  const auto& a = *active;
  TORCH_CHECK(a.is_cuda() && a.scalar_type() == at::kLong && a.dim() == 1 && a.is_contiguous(),
              "active must be a contiguous int64 CUDA vector");
  check_same_device(a, "active", bank, "bank");
  const int64_t k_all = bank.size(0);
  TORCH_CHECK(a.numel() == 0 || (a.min().item<int64_t>() >= 0 && a.max().item<int64_t>() < k_all),
              "active must hold task indices in [0, ", k_all, ")");
  return a.data_ptr<int64_t>();
}

at::Tensor mask_dot(const at::Tensor& bank, const at::Tensor& v, const c10::optional<at::Tensor>& active) {
  check_bank(bank);
  const int64_t L = bank.size(1);
  TORCH_CHECK(v.is_cuda() && v.scalar_type() == at::kFloat && v.is_contiguous() && v.numel() == 32 * L,
              "v must be a contiguous float32 CUDA vector of 32·L = ", 32 * L, " entries");
  check_same_device(v, "v", bank, "bank");
  const int64_t k = active.has_value() ? active->size(0) : bank.size(0);
  c10::cuda::CUDAGuard guard(bank.device());
  auto partial = at::empty({supsup_cuda::mask_dot_chunks(L), k}, v.options());
  if (k == 0 || L == 0) return at::zeros({k}, v.options());
  check_cuda(supsup_cuda::launch_mask_dot(bank.data_ptr<int32_t>(), v.data_ptr<float>(), active_ptr(active, bank),
                                          partial.data_ptr<float>(), k, L, c10::cuda::getCurrentCUDAStream()),
             "mask_dot");
  return partial.sum(0);  // second stage: a fixed-order reduction over the word chunks
}

at::Tensor superpose(const at::Tensor& bank, const at::Tensor& alpha, const c10::optional<at::Tensor>& active) {
  check_bank(bank);
  TORCH_CHECK(alpha.is_cuda() && alpha.scalar_type() == at::kFloat && alpha.dim() == 1 && alpha.is_contiguous(),
              "alpha must be a contiguous float32 CUDA vector");
  check_same_device(alpha, "alpha", bank, "bank");
  const int64_t k = alpha.size(0);
  TORCH_CHECK(active.has_value() ? active->size(0) == k : bank.size(0) == k,
              "alpha has ", k, " entries but the bank (or active list) has a different task count");
  c10::cuda::CUDAGuard guard(bank.device());
  auto out = at::empty({bank.size(1) * 32}, alpha.options());
  check_cuda(supsup_cuda::launch_superpose(bank.data_ptr<int32_t>(), alpha.data_ptr<float>(), active_ptr(active, bank),
                                           out.data_ptr<float>(), k, bank.size(1), c10::cuda::getCurrentCUDAStream()),
             "superpose");
  return out;
}

at::Tensor signed_gemv(const at::Tensor& x, const at::Tensor& sign_words, const at::Tensor& mask_words,
                       const c10::optional<at::Tensor>& bias, double scale) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 CUDA [B, K] tensor");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 16, "x must have 1 to 16 rows (small-batch kernel), got ", x.size(0));
  const int64_t K = x.size(1), N = mask_words.size(0), W = (K + 31) / 32;
  for (const auto* t : {&sign_words, &mask_words}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kInt && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == N && t->size(1) == W,
                "sign_words and mask_words must be contiguous int32 CUDA [N, ceil(K/32)] = [", N, ", ", W, "]");
  }
  check_same_device(sign_words, "sign_words", x, "x");
  check_same_device(mask_words, "mask_words", x, "x");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                "bias must be a contiguous float32 CUDA vector of ", N);
    check_same_device(*bias, "bias", x, "x");
    b = bias->data_ptr<float>();
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({x.size(0), N}, x.options());
  check_cuda(supsup_cuda::launch_signed_gemv(x.data_ptr<float>(), sign_words.data_ptr<int32_t>(),
                                             mask_words.data_ptr<int32_t>(), b, y.data_ptr<float>(), x.size(0), N, K,
                                             static_cast<float>(scale), c10::cuda::getCurrentCUDAStream()),
             "signed_gemv");
  return y;
}

at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& words, bool channels_last) {
  TORCH_CHECK(weight.is_cuda() && weight.is_contiguous(), "weight must be a contiguous CUDA tensor");
  TORCH_CHECK(words.is_cuda() && words.scalar_type() == at::kInt && words.is_contiguous(), "words must be contiguous int32 CUDA");
  check_same_device(words, "words", weight, "weight");
  supsup_cuda::DType dt;
  switch (weight.scalar_type()) {
    case at::kFloat: dt = supsup_cuda::DType::F32; break;
    case at::kHalf: dt = supsup_cuda::DType::F16; break;
    case at::kBFloat16: dt = supsup_cuda::DType::BF16; break;
    default: TORCH_CHECK(false, "weight must be float32, float16 or bfloat16, got ", weight.scalar_type());
  }
  const int64_t rows = weight.size(0), n = weight.numel() / std::max<int64_t>(rows, 1);
  TORCH_CHECK(words.dim() == 2 && words.size(0) == rows && words.size(1) == (n + 31) / 32,
              "words must be [", rows, ", ", (n + 31) / 32, "] for this weight");
  TORCH_CHECK(!channels_last || weight.dim() == 4, "channels_last needs a 4-d conv weight");
  const int64_t channels = channels_last ? weight.size(1) : 1, khw = channels_last ? weight.size(2) * weight.size(3) : 1;
  c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out = channels_last ? at::empty_like(weight, at::MemoryFormat::ChannelsLast) : at::empty_like(weight);
  check_cuda(supsup_cuda::launch_masked_weight(weight.data_ptr(), words.data_ptr<int32_t>(), out.data_ptr(), dt, rows, n,
                                               channels, khw, channels_last, c10::cuda::getCurrentCUDAStream()),
             "masked_weight");
  return out;
}

}  // namespace

TORCH_LIBRARY(supsup_cuda, m) {
  m.def("mask_dot(Tensor bank, Tensor v, Tensor? active) -> Tensor");
  m.def("superpose(Tensor bank, Tensor alpha, Tensor? active) -> Tensor");
  m.def("signed_gemv(Tensor x, Tensor sign_words, Tensor mask_words, Tensor? bias, float scale) -> Tensor");
  m.def("masked_weight(Tensor weight, Tensor words, bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(supsup_cuda, CUDA, m) {
  m.impl("mask_dot", &mask_dot);
  m.impl("superpose", &superpose);
  m.impl("signed_gemv", &signed_gemv);
  m.impl("masked_weight", &masked_weight);
}

#ifdef SUPSUP_PYTHON_MODULE
// Built by setup.py as the Python module supsup_fast._cuda: importing it runs the registrations above.
#include <Python.h>
extern "C" PyObject* PyInit__cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cuda", "supsup_fast CUDA kernels (torch.ops.supsup_cuda)", -1, nullptr};
  return PyModule_Create(&module);
}
#endif
