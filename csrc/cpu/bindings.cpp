// Torch bindings of the CPU kernels: the supsup_cpu op namespace (TORCH_LIBRARY + CPU impls),
// argument checks and threading. Python's CpuBackend calls these; the public supsup:: ops,
// their fake implementations and autograd stay in supsup_fast/ops/.
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>
#include <torch/library.h>
#include <torch/torch.h>

#include "kernels.h"
#include "lut.h"
#include "gemv.h"
#include "small_ops.h"

namespace supsup_cpu {
namespace {

Isa current_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

int64_t words_for(int64_t n) { return (n + 31) / 32; }

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_words(const at::Tensor& t, const char* name) {
  check_cpu_contiguous(t, name);
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must hold int32 words, got ", t.scalar_type());
}

void check_float(const at::Tensor& t, const char* name) {
  check_cpu_contiguous(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32 for the cpu backend, got ", t.scalar_type());
}

// Whether two tensors' memory overlaps (contiguous tensors: their byte ranges).
bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto* a0 = static_cast<const char*>(a.data_ptr());
  const auto* b0 = static_cast<const char*>(b.data_ptr());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// Whether every entry of a contiguous int64 tensor is in [0, hi): one plain loop, no ATen reductions
// (they cost more than the check on the per-step paths).
bool all_in_range(const at::Tensor& t, int64_t hi) {
  const int64_t* p = t.data_ptr<int64_t>();
  bool ok = true;
  for (int64_t i = 0, n = t.numel(); i < n; ++i) ok &= (p[i] >= 0) & (p[i] < hi);
  return ok;
}

const int64_t* active_ptr(const std::optional<at::Tensor>& active, int64_t k) {
  if (!active.has_value()) return nullptr;
  const at::Tensor& a = *active;
  check_cpu_contiguous(a, "active");
  TORCH_CHECK(a.scalar_type() == at::kLong && a.dim() == 1, "active must be a 1-D int64 tensor");
  TORCH_CHECK(all_in_range(a, k), "active task indices must be in [0, ", k, ")");
  return a.data_ptr<int64_t>();
}

std::string isa_op() { return isa_name(current_isa()); }
bool stream_prefetch_op() { return stream_prefetch(); }
bool stream_prefetch_l2_op() { return stream_prefetch_l2(); }
bool shift_indices_op() { return shift_indices(); }
bool wide_gemm_tiles_op() { return wide_gemm_tiles(); }
bool short_gemm_chunks_op() { return short_gemm_chunks(); }
int64_t signed_lut_max_rows_op() { return signed_lut_max_rows(current_isa()); }
std::string vendor_op() { return cpu_vendor(); }

at::Tensor pack_bits_op(const at::Tensor& mask) {
  check_cpu_contiguous(mask, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() >= 1, "mask must be a bool tensor [..., n]");
  const int64_t n = mask.size(-1), W = words_for(n), rows = n ? mask.numel() / n : 0;
  auto sizes = mask.sizes().vec();
  sizes.back() = W;
  at::Tensor words = at::empty(sizes, mask.options().dtype(at::kInt));
  const bool* m = mask.data_ptr<bool>();
  int32_t* w = words.data_ptr<int32_t>();
  at::parallel_for(0, rows, 256, [&](int64_t b, int64_t e) { pack_rows(m, n, W, w, b, e); });
  return words;
}

at::Tensor unpack_bits_op(const at::Tensor& words, int64_t n) {
  check_words(words, "words");
  TORCH_CHECK(n >= 1 && words.dim() >= 1 && words.size(-1) == words_for(n), "words must be [..., ceil(n/32)]");
  const int64_t W = words.size(-1), rows = words.numel() / W;
  auto sizes = words.sizes().vec();
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, words.options().dtype(at::kBool));
  const int32_t* w = words.data_ptr<int32_t>();
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, rows, 256, [&](int64_t b, int64_t e) { unpack_rows(w, n, W, o, b, e); });
  return out;
}

// The packed masks of the transposed weights: words [*, R, ceil(n/32)] -> [*, n, ceil(R/32)].
at::Tensor transpose_masks_op(const at::Tensor& words, int64_t n) {
  check_words(words, "words");
  TORCH_CHECK(n >= 0 && words.dim() >= 2 && words.size(-1) == words_for(n),
              "words must be [*, R, ceil(n/32)] for n = ", n, ", got ", words.sizes());
  auto sizes = words.sizes().vec();
  const int64_t R = sizes[sizes.size() - 2], W = sizes.back();
  const int64_t mats = R * W ? words.numel() / (R * W) : 0;
  sizes[sizes.size() - 2] = n;
  sizes.back() = words_for(R);
  at::Tensor out = at::empty(sizes, words.options());
  if (mats == 0) return out.zero_();
  const int32_t* w = words.data_ptr<int32_t>();
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, mats, 1, [&](int64_t b, int64_t e) { transpose_masks(w, R, n, o, b, e); });
  return out;
}

// Threads take the flat word ranges [bounds[c], bounds[c + 1]) of a bank row-set (each builds its
// own lookup tables once); their partial sums [parts, k] are added in a fixed order, so results do
// not depend on timing.
template <class Fn>
at::Tensor sum_over_ranges(const std::vector<int64_t>& bounds, int64_t k, const at::TensorOptions& opts, Fn fn) {
  const int64_t nparts = static_cast<int64_t>(bounds.size()) - 1;
  at::Tensor parts = at::zeros({nparts, k}, opts);
  float* pp = parts.data_ptr<float>();
  at::parallel_for(0, nparts, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      if (bounds[c] < bounds[c + 1] && k > 0) fn(pp + c * k, bounds[c], bounds[c + 1]);
  });
  return nparts == 1 ? parts.squeeze(0) : parts.sum(0);
}

// Equal shares of total words, in multiples of kMaskDotChunkWords, one per thread.
std::vector<int64_t> even_word_bounds(int64_t total) {
  const int64_t nthreads = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (total + kMaskDotChunkWords - 1) / kMaskDotChunkWords));
  int64_t chunk = (total + nthreads - 1) / nthreads;
  chunk = (chunk + kMaskDotChunkWords - 1) / kMaskDotChunkWords * kMaskDotChunkWords;
  std::vector<int64_t> bounds;
  for (int64_t c = 0; c <= nthreads; ++c) bounds.push_back(std::min(total, c * chunk));
  return bounds;
}

template <class Fn>
at::Tensor sum_over_word_chunks(int64_t total, int64_t k, const at::TensorOptions& opts, Fn fn) {
  return sum_over_ranges(even_word_bounds(total), k, opts, fn);
}

// Row bounds [b[c], b[c + 1]) with about equal numbers of live (query, row) pairs (live[r] of row r),
// one per thread once each thread has kTaskWordsPerThread task words to look up.
std::vector<int64_t> live_row_bounds(const std::vector<int64_t>& live, int64_t W, int64_t k) {
  constexpr int64_t kTaskWordsPerThread = kMaskDotChunkWords * 16;
  const int64_t R = static_cast<int64_t>(live.size());
  int64_t total = 0;
  for (int64_t v : live) total += v;
  const int64_t nthreads = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (total * W * k + kTaskWordsPerThread - 1) / kTaskWordsPerThread));
  std::vector<int64_t> bounds{0};
  for (int64_t r = 0, seen = 0; r < R && static_cast<int64_t>(bounds.size()) < nthreads; ++r) {
    seen += live[r];
    if (seen * nthreads >= total * static_cast<int64_t>(bounds.size())) bounds.push_back(r + 1);
  }
  bounds.push_back(R);
  return bounds;
}

// Row-aligned shares of the R * W words with about equal numbers of rows where g[r] != 0 (the rows
// that a one-query rank-1 mask_dot reads when it skips the others), one per thread once the k tasks'
// live words are worth splitting (a hidden layer of 50 live 10-word rows at k = 2,500 is: on one
// thread it waited on memory, its short runs scattered over 10 MB).
std::vector<int64_t> active_row_bounds(const float* g, int64_t R, int64_t W, int64_t k) {
  std::vector<int64_t> live(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) live[r] = g[r] != 0.0f;
  std::vector<int64_t> bounds = live_row_bounds(live, W, k);
  for (int64_t& b : bounds) b *= W;
  return bounds;
}

// Whether every element of t is finite, through one sum (a non-finite sum may also be a finite
// overflow: then "no", which only costs the callers a shortcut).
bool surely_finite(const at::Tensor& t) { return t.numel() == 0 || std::isfinite(t.sum().item<float>()); }

// Every entry finite, by a plain loop: for a few rows of x, where ATen's reduction costs more.
bool all_finite(const float* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

at::Tensor mask_dot_op(const at::Tensor& bank, const at::Tensor& v, const std::optional<at::Tensor>& active) {
  check_words(bank, "bank");
  check_float(v, "v");
  TORCH_CHECK(bank.dim() >= 2, "bank must be [k, *lead, W]");
  const int64_t k = bank.size(0), W = bank.size(-1), n = v.size(-1);
  TORCH_CHECK(W == words_for(n), "bank has ", W, " words per row but v has n = ", n);
  const int64_t R = v.numel() / std::max<int64_t>(n, 1);
  TORCH_CHECK(bank.numel() == k * R * W, "bank and v disagree on the leading dimensions");
  const int64_t* act = active_ptr(active, k);
  const int64_t m = active.has_value() ? active->numel() : k;  // an empty list: no task (act is null then)
  const int32_t* b = bank.data_ptr<int32_t>();
  const float* vp = v.data_ptr<float>();
  const Isa isa = current_isa();
  return sum_over_word_chunks(R * W, m, v.options(), [&](float* out, int64_t fw0, int64_t fw1) {
    mask_dot(isa, b, R, W, n, vp, act, m, out, fw0, fw1);
  });
}

// inputs_finite: the caller has checked that x and w are finite (CpuBackend checks the bound of
// every product g·x·w), so the rows with g[r] == 0 are skipped without reading x and w again.
at::Tensor mask_dot_rank1_op(const at::Tensor& bank, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                             bool inputs_finite) {
  check_words(bank, "bank");
  check_float(g, "g");
  check_float(x, "x");
  check_float(w, "weight");
  TORCH_CHECK(w.dim() == 2 && g.dim() == 1 && x.dim() == 1 && g.size(0) == w.size(0) && x.size(0) == w.size(1),
              "mask_dot_rank1 needs g [R], x [n] and weight [R, n]");
  const int64_t R = w.size(0), n = w.size(1), W = words_for(n), k = bank.size(0);
  TORCH_CHECK(bank.dim() == 3 && bank.size(1) == R && bank.size(2) == W, "bank must be [k, R, ceil(n/32)]");
  const Isa isa = current_isa();
  if (k < 4) return mask_dot_op(bank, at::outer(g, x).mul_(w), std::nullopt);
  // Rows with g[r] == 0 (dead ReLUs, logits the objective ignores) add exactly zero unless x or w
  // holds inf/NaN; then every row is read, so that 0 · inf gives NaN as in the reference.
  const bool skip = inputs_finite || (surely_finite(x) && surely_finite(w));
  const float* gp = g.data_ptr<float>();
  const std::vector<int64_t> bounds = skip ? active_row_bounds(gp, R, W, k) : even_word_bounds(R * W);
  return sum_over_ranges(bounds, k, w.options(), [&](float* out, int64_t fw0, int64_t fw1) {
    mask_dot_rank1(isa, bank.data_ptr<int32_t>(), R, W, n, gp, x.data_ptr<float>(), w.data_ptr<float>(), k, out, fw0,
                   fw1, skip);
  });
}

at::Tensor mask_dot_batched_op(const at::Tensor& bank, const at::Tensor& v, const std::optional<at::Tensor>& active);

// Every task's masked linear layer on one input: [R, k], out[r, t] = x · (w[r] ⊙ M_t[r]). Rows are
// split across threads; each row's sums are written once (no reduction).
// x [n] and w [R, n], float32 on the CPU: the operands of the row ops.
void check_rows_operands(const at::Tensor& x, const at::Tensor& w, const char* op) {
  check_float(x, "x");
  check_float(w, "weight");
  TORCH_CHECK(w.dim() == 2 && x.dim() == 1 && x.size(0) == w.size(1), op, " needs x [n] and weight [R, n]");
}

// The [R, k] output of a row op (every task's output of each of R rows over n inputs), filled by
// rows(out, r0, r1) in parallel blocks of rows; all zeros where the sum is empty.
template <class Rows>
at::Tensor per_task_rows(int64_t R, int64_t k, int64_t n, const at::TensorOptions& options, Rows rows) {
  at::Tensor out = at::empty({R, k}, options);
  if (R == 0 || k == 0 || n == 0) return out.zero_();  // an empty sum
  float* o = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) { rows(o, r0, r1); });
  return out;
}

at::Tensor mask_dot_rows_op(const at::Tensor& bank, const at::Tensor& x, const at::Tensor& w) {
  check_words(bank, "bank");
  check_rows_operands(x, w, "mask_dot_rows");
  const int64_t R = w.size(0), n = w.size(1), W = words_for(n), k = bank.size(0);
  TORCH_CHECK(bank.dim() == 3 && bank.size(1) == R && bank.size(2) == W, "bank must be [k, R, ceil(n/32)]");
  const Isa isa = current_isa();
  return per_task_rows(R, k, n, w.options(), [&](float* out, int64_t r0, int64_t r1) {
    mask_dot_rows(isa, bank.data_ptr<int32_t>(), R, W, n, x.data_ptr<float>(), w.data_ptr<float>(), k, out, r0, r1);
  });
}


// mask_dot_rows from the task-interleaved copy bank_t [R, W, kp] of a k-task bank: [R, k].
at::Tensor mask_dot_rows_interleaved_op(const at::Tensor& bank_t, int64_t k, const at::Tensor& x, const at::Tensor& w) {
  check_words(bank_t, "bank_t");
  check_rows_operands(x, w, "mask_dot_rows_interleaved");
  const int64_t R = w.size(0), n = w.size(1), W = words_for(n), kp = (k + 15) / 16 * 16;
  TORCH_CHECK(k >= 0 && bank_t.dim() == 3 && bank_t.size(0) == R && bank_t.size(1) == W && bank_t.size(2) == kp,
              "bank_t must be the task-interleaved copy of a ", k, "-task bank: [", R, ", ", W, ", ", kp, "], got ",
              bank_t.sizes());
  const Isa isa = current_isa();
  return per_task_rows(R, k, n, w.options(), [&](float* out, int64_t r0, int64_t r1) {
    mask_dot_rows_interleaved(isa, bank_t.data_ptr<int32_t>(), kp, W, n, x.data_ptr<float>(), w.data_ptr<float>(), k,
                              out, r0, r1);
  });
}

// Below this many tasks the tables cost more than the lookups they save (64 is the least measured);
// below this fraction of live (query, row) pairs the tasks-in-lanes kernel, which skips the dead
// ones, is faster (with every row live the queries-in-lanes kernel took 0.52-0.6 of its time on
// Zen 4, AVX-512 and AVX2, at k = 64, 250 and 2,500; with half the rows live, a little more).
constexpr int64_t kLanesMinTasks = 64;
constexpr double kLanesMinLive = 0.65;
// Given the task-interleaved copy, from this many tasks on it beats the queries-in-lanes kernel even
// with every row live (Zen 4, AVX-512, 16 queries, 500 x 100 and 300 x 784 layers: 0.85x its time
// at k = 2,500, 1.1x at k = 250-1,000).
constexpr int64_t kInterleavedOverLanesTasks = 1500;

// The task-interleaved copy of bank [k, *lead, W]: [*lead, W, kp], word f of task t at f * kp + t, kp
// = k rounded up to 16, zero words for the tasks past k (lut.h interleave_tasks).
at::Tensor interleave_tasks_op(const at::Tensor& bank) {
  check_words(bank, "bank");
  TORCH_CHECK(bank.dim() >= 2, "bank must be [k, *lead, W], got ", bank.dim(), " dimensions");
  auto sizes = bank.sizes().vec();
  const int64_t k = sizes[0], kp = (k + 15) / 16 * 16;
  sizes.erase(sizes.begin());
  int64_t RW = 1;
  for (int64_t s : sizes) RW *= s;
  sizes.push_back(kp);
  at::Tensor out = at::empty(sizes, bank.options());
  const int32_t* b = bank.data_ptr<int32_t>();
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, (RW + 63) / 64, 1, [&](int64_t c0, int64_t c1) {
    interleave_tasks(b, k, RW, kp, o, 64 * c0, std::min(RW, 64 * c1));
  });
  return out;
}

// The weight-interleaved copy of bank [k, *lead, ceil(n/32)]: [*lead, ceil(k/32), np] int32, np = n
// rounded up to 16 (lut.h interleave_weights).
at::Tensor interleave_weights_op(const at::Tensor& bank, int64_t n) {
  check_words(bank, "bank");
  TORCH_CHECK(n >= 0 && bank.dim() >= 2 && bank.size(-1) == words_for(n), "bank must be [k, *lead, ceil(n/32)] for n = ", n,
              ", got ", bank.sizes());
  auto sizes = bank.sizes().vec();
  const int64_t k = sizes[0], W = sizes.back(), KW = (k + 31) / 32, np = (n + 15) / 16 * 16;
  sizes.erase(sizes.begin());
  sizes.pop_back();
  int64_t R = 1;
  for (int64_t s : sizes) R *= s;
  sizes.push_back(KW);
  sizes.push_back(np);
  at::Tensor out = at::empty(sizes, bank.options());
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    interleave_weights(bank.data_ptr<int32_t>(), k, R, W, n, KW, np, out.data_ptr<int32_t>(), r0, r1);
  });
  return out;
}

// superpose of the k-task bank whose weight-interleaved copy is bank_w [*lead, ceil(k/32), np]:
// alpha [k] -> [*lead, n] (lut.h superpose_interleaved). Threads take rows.
at::Tensor superpose_interleaved_op(const at::Tensor& bank_w, int64_t k, const at::Tensor& alpha, int64_t n) {
  check_words(bank_w, "bank_w");
  check_float(alpha, "alpha");
  const int64_t KW = (k + 31) / 32, np = (n + 15) / 16 * 16;
  TORCH_CHECK(k >= 0 && n >= 0 && bank_w.dim() >= 2 && bank_w.size(-2) == KW && bank_w.size(-1) == np,
              "bank_w must be the weight-interleaved copy of a ", k, "-task bank of ", n, "-wide rows: [*lead, ", KW, ", ",
              np, "], got ", bank_w.sizes());
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == k, "alpha must be [", k, "], got ", alpha.sizes());
  auto sizes = bank_w.sizes().vec();
  sizes.pop_back();
  sizes.back() = n;
  const int64_t R = bank_w.numel() / std::max<int64_t>(KW * np, 1);
  at::Tensor out = at::empty(sizes, alpha.options());
  if (k == 0 || R == 0 || n == 0) return out.zero_();
  const Isa isa = current_isa();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    superpose_interleaved(isa, bank_w.data_ptr<int32_t>(), k, KW, n, np, alpha.data_ptr<float>(), out.data_ptr<float>(),
                          r0, r1);
  });
  return out;
}

// mask_dot_rank1_batched over the task-interleaved copy bank_t [R, W, kp] of a k-task bank: every
// query's dead rows are skipped whole, and no word is transposed. Threads take rows with equal
// shares of the live (query, row) pairs and their partial sums are added in a fixed order.
at::Tensor rank1_interleaved(const at::Tensor& bank_t, int64_t k, const at::Tensor& g, const at::Tensor& x,
                             const at::Tensor& w, int64_t j0, int64_t q, bool skip) {
  const int64_t R = w.size(0), n = w.size(1), W = words_for(n), kp = bank_t.size(2);
  const float* gp = g.data_ptr<float>() + j0 * R;
  std::vector<int64_t> live(static_cast<size_t>(R), skip ? 0 : q);
  if (skip)
    for (int64_t j = 0; j < q; ++j)
      for (int64_t r = 0; r < R; ++r) live[r] += gp[j * R + r] != 0.0f;
  const std::vector<int64_t> bounds = live_row_bounds(live, W, k);
  const int64_t nparts = static_cast<int64_t>(bounds.size()) - 1;
  at::Tensor parts = at::zeros({nparts, q, kp}, w.options());
  const Isa isa = current_isa();
  at::parallel_for(0, nparts, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      mask_dot_rank1_interleaved(isa, bank_t.data_ptr<int32_t>(), kp, R, W, n, gp, x.data_ptr<float>() + j0 * n,
                                 w.data_ptr<float>(), q, parts.data_ptr<float>() + c * q * kp, bounds[c], bounds[c + 1],
                                 skip);
  });
  return (nparts == 1 ? parts[0] : parts.sum(0)).narrow(1, 0, k);
}

// g [q, R], x [q, n] and w [R, n], float32 on the CPU: the operands of the rank-1 ops.
void check_rank1_operands(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const char* op) {
  check_float(g, "g");
  check_float(x, "x");
  check_float(w, "weight");
  TORCH_CHECK(w.dim() == 2 && g.dim() == 2 && x.dim() == 2 && g.size(0) == x.size(0) && g.size(1) == w.size(0) &&
                  x.size(1) == w.size(1),
              op, " needs g [q, R], x [q, n] and weight [R, n]");
}

// mask_dot_rank1_batched read from the task-interleaved copy alone: bank_t [R, ceil(n/32), kp] of a
// k-task bank, g [q, R], x [q, n], w [R, n] -> [q, k]. Task inference reads the copy of a layer's
// transposed masks this way (x and g swapped, w transposed): then its dead inputs are skipped.
// inputs_finite: as in mask_dot_rank1_op (the caller has checked x and w; they are not read again).
at::Tensor mask_dot_rank1_interleaved_op(const at::Tensor& bank_t, int64_t k, const at::Tensor& g, const at::Tensor& x,
                                         const at::Tensor& w, bool inputs_finite) {
  check_words(bank_t, "bank_t");
  check_rank1_operands(g, x, w, "mask_dot_rank1_interleaved");
  const int64_t R = w.size(0), n = w.size(1), W = words_for(n), q = g.size(0);
  TORCH_CHECK(k >= 0 && bank_t.dim() == 3 && bank_t.size(0) == R && bank_t.size(1) == W && bank_t.size(2) == (k + 15) / 16 * 16,
              "bank_t must be the task-interleaved copy of a ", k, "-task bank: [", R, ", ", W, ", ", (k + 15) / 16 * 16,
              "], got ", bank_t.sizes());
  if (q == 0 || k == 0 || R == 0 || n == 0) return at::zeros({q, k}, w.options());
  return rank1_interleaved(bank_t, k, g, x, w, 0, q, inputs_finite || (surely_finite(x) && surely_finite(w))).contiguous();
}

at::Tensor rank1_batched(const at::Tensor& bank, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& bank_t, bool skip);

// (⟨Mᵢ, (g_j x_jᵀ) ⊙ w⟩)ⱼᵢ for q one-image queries (g [q, R], x [q, n], w [R, n]): [q, k], in one
// pass over the bits per block of 32 queries, v_j formed inside the table build (never materialised).
// With bank_t, the bank's task-interleaved copy (interleave_tasks), the queries that the
// queries-in-lanes kernel does not take read it instead of the bank.
at::Tensor mask_dot_rank1_batched_op(const at::Tensor& bank, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                     const std::optional<at::Tensor>& bank_t) {
  check_words(bank, "bank");
  check_rank1_operands(g, x, w, "mask_dot_rank1_batched");
  const int64_t R = w.size(0), n = w.size(1), W = words_for(n), k = bank.size(0), q = g.size(0);
  TORCH_CHECK(bank.dim() == 3 && bank.size(1) == R && bank.size(2) == W, "bank must be [k, R, ceil(n/32)]");
  if (bank_t.has_value()) {
    check_words(*bank_t, "bank_t");
    TORCH_CHECK(bank_t->dim() == 3 && bank_t->size(0) == R && bank_t->size(1) == W && bank_t->size(2) == (k + 15) / 16 * 16,
                "bank_t must be the task-interleaved copy of bank: [", R, ", ", W, ", ", (k + 15) / 16 * 16, "], got ",
                bank_t->sizes());
  }
  if (q == 0 || k == 0 || R == 0) return at::zeros({q, k}, w.options());
  return rank1_batched(bank, g, x, w, bank_t, surely_finite(x) && surely_finite(w));  // as in mask_dot_rank1_op
}

// The body of mask_dot_rank1_batched (checked, q, k and R > 0); skip: x and w are finite, so the
// rows with g = 0 may be skipped.
at::Tensor rank1_batched(const at::Tensor& bank, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& bank_t, bool skip) {
  const int64_t R = w.size(0), n = w.size(1), W = words_for(n), k = bank.size(0), q = g.size(0);
  const Isa isa = current_isa();
  if (!bank_t.has_value() && k < 4)
    return mask_dot_batched_op(bank, g.unsqueeze(2).mul(x.unsqueeze(1)).mul_(w), std::nullopt);
  std::vector<at::Tensor> parts;
  int64_t j0 = 0;
  // Full groups of 16 queries go to the queries-in-lanes kernel (lut_lanes.cpp) when there are enough
  // tasks to repay its tables, and enough live rows: the tasks-in-lanes kernel skips each query's
  // rows with g = 0 (about half of a ReLU layer's), the other cannot.
  int64_t live_pairs = 0;
  const float* gp = g.data_ptr<float>();
  for (int64_t i = 0; i < q * R; ++i) live_pairs += gp[i] != 0.0f;
  const double live = skip ? static_cast<double>(live_pairs) / static_cast<double>(q * R) : 1.0;
  if (lanes_available(isa) && k >= kLanesMinTasks && live >= kLanesMinLive &&
      !(bank_t.has_value() && k >= kInterleavedOverLanesTasks))
    for (; j0 + kQueryLanes <= q; j0 += kQueryLanes) {
      const at::Tensor gT = g.narrow(0, j0, kQueryLanes).t().contiguous();
      const at::Tensor xT = x.narrow(0, j0, kQueryLanes).t().contiguous();
      parts.push_back(sum_over_word_chunks(R * W, k * kQueryLanes, w.options(), [&](float* out, int64_t fw0, int64_t fw1) {
        mask_dot_rank1_lanes(isa, bank.data_ptr<int32_t>(), R, W, n, gT.data_ptr<float>(), xT.data_ptr<float>(),
                             w.data_ptr<float>(), k, out, fw0, fw1);
      }).view({k, kQueryLanes}).t());
    }
  if (bank_t.has_value() && j0 < q) {
    parts.push_back(rank1_interleaved(*bank_t, k, g, x, w, j0, q - j0, skip));
    j0 = q;
  }
  // The rest, up to 32 queries a pass, with the tasks in the lanes.
  constexpr int64_t kQueryBlock = 32;
  for (; j0 < q; j0 += kQueryBlock) {
    const int64_t nq = std::min(kQueryBlock, q - j0);
    parts.push_back(sum_over_word_chunks(R * W, nq * k, w.options(), [&](float* out, int64_t fw0, int64_t fw1) {
      mask_dot_lut_rank1(isa, bank.data_ptr<int32_t>(), R, W, n, g.data_ptr<float>() + j0 * R, x.data_ptr<float>() + j0 * n,
                         w.data_ptr<float>(), nq, k, out, fw0, fw1, skip);
    }).view({nq, k}));
  }
  return parts.size() == 1 ? parts[0].contiguous() : at::cat(parts, 0);
}

// max |t| of a contiguous float tensor, NaN if t holds one: a plain loop where t is small (a query's
// activations: ATen's reduction costs more than it), else one min-max reduction.
double abs_max(const at::Tensor& t) {
  if (t.numel() <= 4096) {
    const float* p = t.data_ptr<float>();
    float m = 0.0f;
    for (int64_t i = 0; i < t.numel(); ++i) {
      if (std::isnan(p[i])) return NAN;
      m = std::max(m, std::fabs(p[i]));
    }
    return m;
  }
  const auto [lo, hi] = at::aminmax(t);
  const double l = lo.item<double>(), h = hi.item<double>();
  return std::isnan(l) || std::isnan(h) ? NAN : std::max(-l, h);
}

// The α-gradients of q one-image queries through a ReLU MLP, the backward of task inference in one
// call: layer i, last first, adds mask_dot_rank1_batched(banks[i], g_i, inputs[i], weights[i],
// copies[i]), or where transposed[i] the same sums read from the copy of its transposed masks,
// mask_dot_rank1_interleaved(copies[i], k, inputs[i], g_i, weights[i] = Wᵢᵀ), and passes down
// g_{i-1} = (g_i backward_weights[i]) ⊙ 1[inputs[i] > 0]. g is the last layer's g. Returns
// (out [q, k], true), or (empty, false) where a layer's products g·x·w might not be finite: the
// caller then goes op by op, whose reference follows IEEE there.
std::tuple<at::Tensor, bool> mlp_mask_dot_outer_op(const std::vector<at::Tensor>& banks, const std::vector<at::Tensor>& copies,
                                                   const c10::List<bool>& transposed, const std::vector<at::Tensor>& weights,
                                                   const std::vector<at::Tensor>& backward_weights,
                                                   const std::vector<at::Tensor>& inputs, const at::Tensor& g) {
  const size_t L = banks.size();
  TORCH_CHECK(L >= 1 && copies.size() == L && transposed.size() == L && weights.size() == L && backward_weights.size() == L &&
                  inputs.size() == L,
              "mlp_mask_dot_outer needs one bank, copy, orientation, weight, backward weight and input per layer");
  check_float(g, "g");
  const int64_t k = banks[0].size(0), q = g.size(0);
  for (size_t i = 0; i < L; ++i) {
    check_words(banks[i], "banks");
    check_words(copies[i], "copies");
    check_float(weights[i], "weights");
    check_float(backward_weights[i], "backward_weights");
    check_float(inputs[i], "inputs");
    const at::Tensor& u = backward_weights[i];
    TORCH_CHECK(u.dim() == 2 && inputs[i].dim() == 2 && inputs[i].size(0) == q && inputs[i].size(1) == u.size(1),
                "layer ", i, ": inputs must be [q, n] and backward_weights [R, n]");
    const int64_t R = u.size(0), n = u.size(1);
    TORCH_CHECK(banks[i].dim() == 3 && banks[i].size(0) == k && banks[i].size(1) == R && banks[i].size(2) == words_for(n),
                "layer ", i, ": banks must be [k, R, ceil(n/32)] with one k");
    const int64_t a = transposed.get(i) ? n : R, b = transposed.get(i) ? R : n;
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(0) == a && weights[i].size(1) == b, "layer ", i,
                ": weights must be [R, n], or [n, R] for a transposed copy");
    TORCH_CHECK(copies[i].dim() == 3 && copies[i].size(0) == a && copies[i].size(1) == words_for(b) &&
                    copies[i].size(2) == (k + 15) / 16 * 16,
                "layer ", i, ": copies must be interleave_tasks(bank), or of transpose_masks(bank) where transposed");
    TORCH_CHECK(i + 1 == L ? g.dim() == 2 && g.size(1) == R : inputs[i + 1].size(1) == R, "layer ", i,
                ": its R outputs must be the next layer's inputs (g [q, R] for the last)");
  }
  at::Tensor out = at::zeros({q, k}, g.options());
  if (q == 0 || k == 0) return {out, true};
  at::Tensor gi = g;
  for (size_t i = L; i-- > 0;) {
    const at::Tensor& x = inputs[i];
    const double bound = abs_max(gi) * abs_max(x) * abs_max(weights[i]);
    if (!(bound < std::numeric_limits<float>::max())) return {at::empty({0}, g.options()), false};
    if (gi.size(1) > 0 && x.size(1) > 0)
      out += transposed.get(i) ? rank1_interleaved(copies[i], k, x, gi, weights[i], 0, q, true)
                           : rank1_batched(banks[i], gi, x, weights[i], copies[i], true);
    if (i > 0) gi = at::mm(gi, backward_weights[i]).mul_(x.gt(0));
  }
  return {out, true};
}

int64_t nonzero_floats(const at::Tensor& t) {
  const float* p = t.data_ptr<float>();
  int64_t c = 0;
  for (int64_t i = 0; i < t.numel(); ++i) c += p[i] != 0.0f;
  return c;
}

// The forward of task inference through a ReLU MLP and its objective's gradient w.r.t. the logits,
// with the same ATen ops as the Python way (algorithms.inference, objectives.logit_gradients), so the
// same floats: returns each layer's input [x, h_1, ..., h_{L-1}], g [q, out] and the count of
// nonzeros of each input and of g (L + 1 counts).
std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<int64_t>> mlp_logit_gradients_op(
    const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<std::optional<at::Tensor>>& biases,
    c10::string_view objective, int64_t num_labels) {
  TORCH_CHECK(!weights.empty() && biases.size() == weights.size(), "mlp_logit_gradients needs one weight and bias per layer");
  TORCH_CHECK(objective == "entropy" || objective == "superfluous", "objective must be entropy or superfluous, got ", objective);
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [q, n], got ", x.sizes());
  std::vector<at::Tensor> inputs{x};
  std::vector<int64_t> nonzero{nonzero_floats(x)};
  at::Tensor h = x;
  for (size_t i = 0; i < weights.size(); ++i) {
    check_float(weights[i], "weights");
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(1) == h.size(1), "layer ", i, ": weights must be [out, ", h.size(1),
                "], got ", weights[i].sizes());
    h = at::linear(h, weights[i], biases[i]);
    if (i + 1 < weights.size()) {
      h = h.relu();
      inputs.push_back(h);
      nonzero.push_back(nonzero_floats(h));
    }
  }
  at::Tensor g;
  if (objective == "entropy") {  // -p ⊙ (log p + H)
    const at::Tensor logp = at::log_softmax(h, 1), p = logp.exp();
    const at::Tensor ent = -(p * logp).sum(1, true);
    g = -p * (logp + ent);
  } else {  // softmax on the superfluous neurons, 0 on the real ones
    g = at::softmax(h, 1);
    g.narrow(1, 0, std::min<int64_t>(std::max<int64_t>(num_labels, 0), g.size(1))).zero_();
  }
  nonzero.push_back(nonzero_floats(g));
  return {inputs, g, nonzero};
}

// (⟨Mᵢ, v_j⟩)ⱼᵢ for q queries v [q, *lead, n] in one pass over the bits: [q, k].
at::Tensor mask_dot_batched_op(const at::Tensor& bank, const at::Tensor& v, const std::optional<at::Tensor>& active) {
  check_words(bank, "bank");
  check_float(v, "v");
  TORCH_CHECK(bank.dim() >= 2 && v.dim() >= 2, "bank must be [k, *lead, W] and v [q, *lead, n]");
  const int64_t k = bank.size(0), W = bank.size(-1), n = v.size(-1), q = v.size(0);
  TORCH_CHECK(W == words_for(n), "bank has ", W, " words per row but v has n = ", n);
  const int64_t per_query = q ? v.numel() / q : 0;
  const int64_t R = per_query / std::max<int64_t>(n, 1);
  TORCH_CHECK(bank.numel() == k * R * W, "bank and v disagree on the leading dimensions");
  const int64_t* act = active_ptr(active, k);
  const int64_t m = active.has_value() ? active->numel() : k;  // an empty list: no task (act is null then)
  if (q == 0 || m == 0 || R == 0) return at::zeros({q, m}, v.options());
  const int32_t* b = bank.data_ptr<int32_t>();
  const float* vp = v.data_ptr<float>();
  const Isa isa = current_isa();
  // Queries in blocks of 32: each block is one pass over the bits, with its tables in L2.
  constexpr int64_t kQueryBlock = 32;
  std::vector<at::Tensor> parts;
  for (int64_t j0 = 0; j0 < q; j0 += kQueryBlock) {
    const int64_t nq = std::min(kQueryBlock, q - j0);
    parts.push_back(sum_over_word_chunks(R * W, nq * m, v.options(), [&](float* out, int64_t fw0, int64_t fw1) {
      mask_dot_lut(isa, b, R, W, n, vp + j0 * per_query, nq, per_query, act, m, out, fw0, fw1);
    }).view({nq, m}));
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, 0);
}

at::Tensor superpose_op(const at::Tensor& bank, const at::Tensor& alpha, int64_t n, const std::optional<at::Tensor>& active) {
  check_words(bank, "bank");
  check_float(alpha, "alpha");
  TORCH_CHECK(bank.dim() >= 2 && bank.size(-1) == words_for(n), "bank must be [k, *lead, ceil(n/32)]");
  const int64_t k = bank.size(0), W = bank.size(-1), R = bank.numel() / std::max<int64_t>(k * W, 1);
  const int64_t* act = active_ptr(active, k);
  const int64_t m = active.has_value() ? active->numel() : k;  // an empty list: no task (act is null then)
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == m, "alpha must have one entry per (active) task");
  auto sizes = bank.sizes().vec();
  sizes.erase(sizes.begin());
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, alpha.options());
  const int32_t* b = bank.data_ptr<int32_t>();
  const float* a = alpha.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const Isa isa = current_isa();
  if (m == 0) return out.zero_();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) { superpose(isa, b, m, W, n, R, a, act, o, r0, r1); });
  return out;
}

void masked_weight_into_op(const at::Tensor& w, const at::Tensor& words, at::Tensor out) {
  check_float(w, "weight");
  check_words(words, "mask_words");
  check_float(out, "out");
  TORCH_CHECK(out.sizes() == w.sizes(), "out must be shaped like weight");
  const int64_t R = w.size(0), n = w.numel() / std::max<int64_t>(R, 1), W = words_for(n);
  TORCH_CHECK(words.dim() == 2 && words.size(0) == R && words.size(1) == W, "mask_words must be [out, ceil(n/32)]");
  const float* wp = w.data_ptr<float>();
  const int32_t* m = words.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const Isa isa = current_isa();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) { masked_weight(isa, wp, m, n, W, o, r0, r1); });
}

at::Tensor masked_weight_op(const at::Tensor& w, const at::Tensor& words) {
  at::Tensor out = at::empty_like(w);
  masked_weight_into_op(w, words, out);
  return out;
}

// The optional bias [R] of a small-batch op, checked; nullptr when absent.
const float* bias_pointer(const std::optional<at::Tensor>& bias, int64_t R) {
  if (!bias.has_value()) return nullptr;
  check_float(*bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == R, "bias must have shape [", R, "]");
  return bias->data_ptr<float>();
}

// Shared by the two small-batch ops: checks x and bias, allocates y [*, R] and the transposed,
// zero-padded copy of x that the AVX-512 kernels read.
struct SmallBatch {
  at::Tensor y, xt;
  const float* bias;
  int64_t B;
};

// Rows (or columns) per parallel chunk of the small-batch ops over an [R, n] weight: at least 2^16
// weights (256 KiB of fp32) a chunk, so a layer of up to 64 Ki weights runs on the calling thread.
// Forking the pool costs more than a second thread saves there (Intel Xeon VM, masked_linear_small
// alone, one thread against two: 32 x 32 3.6 against 7.2 µs at batch 1; 100 x 300 6.2 against 8.1,
// and 12 against 16-20 at batch 8; 128 x 512 6.4 against 10.5; MKL's GEMM alike). Larger layers
// split as before: past one core's L2 two threads win outright (1024 x 1024, batch 1: 166 against 66).
int64_t small_batch_grain(int64_t per_row) {
  constexpr int64_t kMinChunkWeights = int64_t{1} << 16;
  return std::max<int64_t>(16, (kMinChunkWeights + per_row - 1) / std::max<int64_t>(per_row, 1));
}

SmallBatch prepare_small_batch(const at::Tensor& x, int64_t n, int64_t W, int64_t R,
                               const std::optional<at::Tensor>& bias, const char* op) {
  check_float(x, "x");
  TORCH_CHECK(n > 0, op, " needs at least one input feature");
  const int64_t B = x.numel() / n;
  TORCH_CHECK(B <= 16, op, " takes at most 16 rows of x, got ", B);
  const float* bp = bias_pointer(bias, R);
  auto sizes = x.sizes().vec();
  sizes.back() = R;
  SmallBatch s{at::empty(sizes, x.options()), at::empty({W * B * 32}, x.options()), bp, B};
  transpose_small_batch(x.data_ptr<float>(), B, n, W, s.xt.data_ptr<float>());
  return s;
}

}  // namespace

// Declared in small_ops.h: python_module.cpp calls them directly too.
at::Tensor masked_linear_small(const at::Tensor& x, const at::Tensor& w, const at::Tensor& words,
                                  const std::optional<at::Tensor>& bias) {
  check_float(w, "weight");
  check_words(words, "mask_words");
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "x must be [*, in] for weight [out, in]");
  const int64_t R = w.size(0), n = w.size(1), W = words_for(n);
  TORCH_CHECK(words.size(0) == R && words.size(1) == W, "mask_words must be [out, ceil(in/32)]");
  SmallBatch s = prepare_small_batch(x, n, W, R, bias, "masked_linear_small");
  const Isa isa = current_isa();
  at::parallel_for(0, R, small_batch_grain(n), [&](int64_t r0, int64_t r1) {
    masked_gemm_small(isa, x.data_ptr<float>(), s.xt.data_ptr<float>(), s.B, w.data_ptr<float>(),
                      words.data_ptr<int32_t>(), n, W, R, s.bias, s.y.data_ptr<float>(), r0, r1);
  });
  return s.y;
}

at::Tensor signed_masked_linear_small(const at::Tensor& x, const at::Tensor& sign_words, const at::Tensor& mask_words,
                                         double scale, const std::optional<at::Tensor>& bias) {
  check_words(sign_words, "sign_words");
  check_words(mask_words, "mask_words");
  TORCH_CHECK(sign_words.sizes() == mask_words.sizes() && mask_words.dim() == 2, "sign_words and mask_words must both be [out, W]");
  const int64_t R = mask_words.size(0), W = mask_words.size(1), n = x.size(-1);
  TORCH_CHECK(W == words_for(n), "mask_words has ", W, " words per row but x has ", n, " features");
  // Words built for more features than x has (70 against 65: the same 3 words) set bits past n:
  // refused, as the Python op refuses them (it is called directly for small-batch inference).
  if (n % 32 && R) {
    const int32_t* sp = sign_words.data_ptr<int32_t>();
    const int32_t* mp = mask_words.data_ptr<int32_t>();
    uint32_t past = 0;
    for (int64_t r = 0; r < R; ++r) past |= static_cast<uint32_t>(sp[r * W + W - 1] | mp[r * W + W - 1]);
    TORCH_CHECK((past >> (n % 32)) == 0, "sign_words/mask_words have bits set past bit ", n, ": built for more than the ",
                n, " features of x");
  }
  SmallBatch s = prepare_small_batch(x, n, W, R, bias, "signed_masked_linear_small");
  const Isa isa = current_isa();
  if (s.B <= signed_lut_max_rows(isa) && std::isfinite(scale) && all_finite(x.data_ptr<float>(), x.numel())) {
    // Table lookups (signed_lut.cpp; 1.3-3.3x the direct kernel at 300 x 784 and 1024 x 1024 on the
    // Xeon VM), in blocks of 16 rows (a vector's lanes), chunks of 2^17 weights times rows of x (2^15
    // to 2^18 ran alike, 2^16 and 2^17 best by a little at 300 x 784).
    at::Tensor tables = at::empty({signed_lut_table_floats(isa, s.B, W)}, x.options());  // 64-byte aligned
    signed_lut_tables(isa, s.xt.data_ptr<float>(), s.B, W, tables.data_ptr<float>());
    const int64_t blocks = (R + 15) / 16;
    at::parallel_for(0, blocks, std::max<int64_t>(1, (int64_t{1} << 17) / (16 * n * s.B)), [&](int64_t b0, int64_t b1) {
      signed_gemv_lut(isa, tables.data_ptr<float>(), s.B, sign_words.data_ptr<int32_t>(), mask_words.data_ptr<int32_t>(),
                      static_cast<float>(scale), W, R, s.bias, s.y.data_ptr<float>(), 16 * b0, std::min(R, 16 * b1));
    });
    return s.y;
  }
  at::parallel_for(0, R, small_batch_grain(n), [&](int64_t r0, int64_t r1) {
    signed_masked_gemm_small(isa, x.data_ptr<float>(), s.xt.data_ptr<float>(), s.B, sign_words.data_ptr<int32_t>(),
                             mask_words.data_ptr<int32_t>(), static_cast<float>(scale), n, W, R, s.bias,
                             s.y.data_ptr<float>(), r0, r1);
  });
  return s.y;
}

namespace {

// y = x (W ⊙ M)ᵀ + b for any number of rows of x (masked_gemm.cpp): the mask applied while packing
// W, so W ⊙ M is never written to memory. gemm(B, bias, y, r0, r1) fills rows [r0, r1) of the
// outputs; they are split across threads.
template <class Gemm>
at::Tensor packed_gemm_output(const at::Tensor& x, int64_t n, int64_t R, const std::optional<at::Tensor>& bias, Gemm gemm) {
  const float* bp = bias_pointer(bias, R);
  auto sizes = x.sizes().vec();
  sizes.back() = R;
  at::Tensor y = at::empty(sizes, x.options());
  const int64_t B = R ? y.numel() / R : 0;
  if (B == 0 || R == 0) return y;
  if (n == 0) return bias.has_value() ? y.copy_(*bias) : y.zero_();  // an empty sum: the bias alone
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, R, 32, [&](int64_t r0, int64_t r1) { gemm(B, bp, yp, r0, r1); });
  return y;
}

at::Tensor masked_linear_gemm_op(const at::Tensor& x, const at::Tensor& w, const at::Tensor& words,
                                 const std::optional<at::Tensor>& bias) {
  check_float(w, "weight");
  check_words(words, "mask_words");
  check_float(x, "x");
  TORCH_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), "x must be [*, in] for weight [out, in]");
  const int64_t R = w.size(0), n = w.size(1), W = words_for(n);
  TORCH_CHECK(words.dim() == 2 && words.size(0) == R && words.size(1) == W, "mask_words must be [out, ceil(in/32)]");
  const Isa isa = current_isa();
  return packed_gemm_output(x, n, R, bias, [&](int64_t B, const float* bp, float* y, int64_t r0, int64_t r1) {
    masked_gemm(isa, x.data_ptr<float>(), B, w.data_ptr<float>(), words.data_ptr<int32_t>(), n, W, R, bp, y, r0, r1);
  });
}

at::Tensor signed_masked_linear_gemm_op(const at::Tensor& x, const at::Tensor& sign_words, const at::Tensor& mask_words,
                                        double scale, const std::optional<at::Tensor>& bias) {
  check_words(sign_words, "sign_words");
  check_words(mask_words, "mask_words");
  check_float(x, "x");
  TORCH_CHECK(sign_words.sizes() == mask_words.sizes() && mask_words.dim() == 2, "sign_words and mask_words must both be [out, W]");
  const int64_t R = mask_words.size(0), W = mask_words.size(1), n = x.size(-1);
  TORCH_CHECK(W == words_for(n), "mask_words has ", W, " words per row but x has ", n, " features");
  const Isa isa = current_isa();
  return packed_gemm_output(x, n, R, bias, [&](int64_t B, const float* bp, float* y, int64_t r0, int64_t r1) {
    signed_masked_gemm(isa, x.data_ptr<float>(), B, sign_words.data_ptr<int32_t>(), mask_words.data_ptr<int32_t>(),
                       static_cast<float>(scale), n, W, R, bp, y, r0, r1);
  });
}

void signed_masked_weight_into_op(const at::Tensor& sign_words, const at::Tensor& mask_words, double scale,
                                  at::Tensor out) {
  check_words(sign_words, "sign_words");
  check_words(mask_words, "mask_words");
  check_float(out, "out");
  TORCH_CHECK(sign_words.sizes() == mask_words.sizes() && mask_words.dim() == 2, "sign_words and mask_words must both be [out, W]");
  const int64_t R = mask_words.size(0), W = mask_words.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == R && words_for(out.size(1)) == W, "out must be [out, n] with ceil(n/32) = W");
  const int64_t n = out.size(1);
  const Isa isa = current_isa();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    signed_masked_weight(isa, sign_words.data_ptr<int32_t>(), mask_words.data_ptr<int32_t>(), static_cast<float>(scale), n,
                         W, out.data_ptr<float>(), r0, r1);
  });
}

// y = x (W ⊙ S)ᵀ + b and dx = g (W ⊙ S) for a few rows of x, W ⊙ S never materialised.
void check_scaled(const at::Tensor& w, const at::Tensor& s) {
  check_float(w, "weight");
  check_float(s, "s");
  TORCH_CHECK(w.dim() == 2 && s.sizes() == w.sizes(), "weight and s must both be [out, in]");
}

at::Tensor scaled_linear_small_op(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                                  const std::optional<at::Tensor>& bias) {
  check_scaled(w, s);
  check_float(x, "x");
  const int64_t R = w.size(0), n = w.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == n, "x must be [*, in] for weight [out, in]");
  const int64_t B = x.numel() / std::max<int64_t>(n, 1);
  TORCH_CHECK(B <= 16, "scaled_linear_small takes at most 16 rows of x, got ", B);
  const float* bp = bias_pointer(bias, R);
  auto sizes = x.sizes().vec();
  sizes.back() = R;
  at::Tensor y = at::empty(sizes, x.options());
  const Isa isa = current_isa();
  at::parallel_for(0, R, small_batch_grain(n), [&](int64_t r0, int64_t r1) {
    scaled_gemm_small(isa, x.data_ptr<float>(), B, w.data_ptr<float>(), s.data_ptr<float>(), n, R, bp,
                      y.data_ptr<float>(), r0, r1);
  });
  return y;
}

at::Tensor scaled_linear_small_t_op(const at::Tensor& g, const at::Tensor& w, const at::Tensor& s) {
  check_scaled(w, s);
  check_float(g, "grad");
  const int64_t R = w.size(0), n = w.size(1);
  TORCH_CHECK(g.dim() >= 1 && g.size(-1) == R, "grad must be [*, out] for weight [out, in]");
  const int64_t B = g.numel() / std::max<int64_t>(R, 1);
  TORCH_CHECK(B <= 16, "scaled_linear_small_t takes at most 16 rows of grad, got ", B);
  auto sizes = g.sizes().vec();
  sizes.back() = n;
  at::Tensor dx = at::empty(sizes, g.options());
  const Isa isa = current_isa();
  at::parallel_for(0, n, std::max<int64_t>(256, small_batch_grain(R)), [&](int64_t j0, int64_t j1) {
    scaled_gemm_small_t(isa, g.data_ptr<float>(), B, w.data_ptr<float>(), s.data_ptr<float>(), n, R,
                        dx.data_ptr<float>(), j0, j1);
  });
  return dx;
}

RmspropScalars rmsprop_scalars(double lr, double alpha, double eps, double weight_decay) {
  return {static_cast<float>(lr), static_cast<float>(alpha), static_cast<float>(1.0 - alpha), static_cast<float>(eps),
          static_cast<float>(weight_decay)};
}

void rmsprop_step_op(at::Tensor param, const at::Tensor& grad, at::Tensor square_avg, double lr, double alpha, double eps,
                     double weight_decay) {
  check_float(param, "param");
  check_float(grad, "grad");
  check_float(square_avg, "square_avg");
  TORCH_CHECK(param.numel() == grad.numel() && param.numel() == square_avg.numel(), "param, grad and square_avg must match");
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* s = square_avg.data_ptr<float>();
  const RmspropScalars c = rmsprop_scalars(lr, alpha, eps, weight_decay);
  at::parallel_for(0, param.numel(), 1 << 14, [&](int64_t i0, int64_t i1) { rmsprop_step(current_isa(), p, g, s, c, i0, i1); });
}

void ste_rmsprop_step_op(at::Tensor param, const at::Tensor& weight_grad, const at::Tensor& weight, at::Tensor square_avg,
                         at::Tensor masked_weight, double lr, double alpha, double eps, double weight_decay) {
  check_float(param, "param");
  check_float(weight_grad, "weight_grad");
  check_float(weight, "weight");
  check_float(square_avg, "square_avg");
  check_float(masked_weight, "masked_weight");
  const int64_t n = param.numel();
  TORCH_CHECK(weight_grad.numel() == n && weight.numel() == n && square_avg.numel() == n && masked_weight.numel() == n,
              "param, weight_grad, weight, square_avg and masked_weight must have the same number of elements");
  float* p = param.data_ptr<float>();
  const float* dw = weight_grad.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* s = square_avg.data_ptr<float>();
  float* out = masked_weight.data_ptr<float>();
  const RmspropScalars c = rmsprop_scalars(lr, alpha, eps, weight_decay);
  at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) { ste_rmsprop_step(current_isa(), p, dw, w, s, out, c, i0, i1); });
}

void ste_adam_step_op(at::Tensor param, const at::Tensor& weight_grad, const at::Tensor& weight, at::Tensor exp_avg,
                      at::Tensor exp_avg_sq, at::Tensor masked_weight, int64_t step, double lr, double beta1, double beta2,
                      double eps, double weight_decay) {
  const std::pair<const at::Tensor*, const char*> all[] = {{&param, "param"}, {&weight_grad, "weight_grad"}, {&weight, "weight"},
                                                           {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"},
                                                           {&masked_weight, "masked_weight"}};
  for (const auto& [t, name] : all) {
    check_float(*t, name);
    TORCH_CHECK(t->numel() == param.numel(), name, " must have as many elements as param (", param.numel(), "), got ", t->numel());
  }
  TORCH_CHECK(step >= 1, "step must be >= 1 (the count of updates including this one), got ", step);
  AdamScalars c{static_cast<float>(1.0 - beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                      static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step)))),
                      static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)))),
                      static_cast<float>(eps), static_cast<float>(weight_decay), 0.0f, false};
  c.m_from_g = std::abs(c.one_minus_beta1) >= 0.5f;
  c.m_coef = c.m_from_g ? c.one_minus_beta1 - 1.0f : c.one_minus_beta1;
  float* p = param.data_ptr<float>();
  const float* dw = weight_grad.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  float* out = masked_weight.data_ptr<float>();
  at::parallel_for(0, param.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
    ste_adam_step(current_isa(), p, dw, w, m, v, out, c, i0, i1);
  });
}

// Mean cross-entropy of logits h [B, C] against labels y (in range) and its gradient (softmax - onehot) / B
// in one pass per row. Logits that are not all finite go through ATen's log_softmax, whose NaN and
// infinity semantics the loss and gradient then follow.
std::pair<at::Tensor, at::Tensor> cross_entropy_and_grad(const at::Tensor& h, const at::Tensor& y) {
  const int64_t B = h.size(0), C = h.size(1);
  const at::Tensor z = h.contiguous(), labels = y.contiguous();
  at::Tensor dz = at::empty_like(z);
  const float* zp = z.data_ptr<float>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  float* d = dz.data_ptr<float>();
  const Isa isa = current_isa();
  const float scale = static_cast<float>(1.0 / static_cast<double>(B));
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, B * C / 16384));
  std::vector<double> part(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) part[c] = softmax_cross_entropy_rows(isa, zp, C, lab, scale, d, B * c / chunks, B * (c + 1) / chunks);
  });
  double total = 0.0;
  for (double p : part) total += p;
  if (std::isfinite(total)) return {at::scalar_tensor(total / static_cast<double>(B), h.options()), dz};
  const at::Tensor log_probs = at::log_softmax(h, 1);
  dz = log_probs.exp();
  d = dz.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) d[i * C + lab[i]] -= 1.0f;
  dz.div_(static_cast<double>(B));
  return {at::nll_loss(log_probs, y), dz};
}

// The loss of an MLP of L linear layers (ReLU between, no biases) under mean cross-entropy, by hand,
// without autograd: the training step of the paper's MNIST MLPs (LeNet-300-100, FC1024) costs its
// GEMMs plus a few elementwise passes. forward(l, h) is layer l's output h Wₗᵀ and input_grad(l, dz)
// its input gradient dz Wₗ. weight_step(l, dz, input) runs once per layer, last layer first, with
// the layer's output gradient dz [B, out] and its input [B, in] (its weight gradient is dzᵀ input);
// layer l has then been used for the last time (the input gradient of layer l - 1 is formed first),
// so the step may overwrite its weight. The first layer's input gradient is not formed.
template <class Forward, class InputGrad, class WeightStep>
at::Tensor mlp_backward(const at::Tensor& x, const at::Tensor& y, int64_t L, Forward forward, InputGrad input_grad,
                        WeightStep weight_step) {
  TORCH_CHECK(L > 0, "the MLP must have at least one layer");
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [batch, features], got ", x.dim(), " dims");
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == x.size(0),
              "y must be a CPU int64 vector of one label per row of x");
  std::vector<at::Tensor> inputs{x.contiguous()};
  at::Tensor h = inputs[0];
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor z = forward(l, h);
    h = l + 1 < L ? at::relu_(z) : z;
    if (l + 1 < L) inputs.push_back(h);
  }
  const int64_t B = x.size(0), C = h.size(1);
  TORCH_CHECK(B > 0, "x must have at least one row");
  TORCH_CHECK(all_in_range(y.contiguous(), C), "y must hold class indices in [0, ", C, ")");
  auto [loss, dz] = cross_entropy_and_grad(h, y);
  for (int64_t l = L - 1; l >= 0; --l) {  // the input gradient first: the weight step rewrites the layer's weight
    at::Tensor dz_below = l > 0 ? at::threshold_backward(input_grad(l, dz), inputs[l], 0) : at::Tensor();
    weight_step(l, dz, inputs[l]);
    dz = dz_below;
  }
  return loss;
}

// a @ b through BLAS as beta = 1 onto zeros cleared here. Given beta = 0, MKL clears the output itself
// (sgemm_mscale), slowly: on AVX2 (Zen 4) a fifth of the LeNet training step's samples, and the
// step measured 1.02-1.06x faster with each of its GEMMs done this way, the FC1024 bits step 1.03-1.06x
// (interleaved A/B runs).
at::Tensor mm_onto_zeros(const at::Tensor& a, const at::Tensor& b) {
  return at::zeros({a.size(0), b.size(1)}, a.options()).addmm_(a, b);
}

// mlp_backward with float weights [out, in] and BLAS GEMMs.
template <class WeightStep>
at::Tensor mlp_backward(const at::Tensor& x, const at::Tensor& y, at::TensorList weights, WeightStep weight_step) {
  auto forward = [&](int64_t l, const at::Tensor& h) {
    const at::Tensor& w = weights[l];
    check_float(w, "weights");
    TORCH_CHECK(w.dim() == 2 && w.size(1) == h.size(1), "weights[", l, "] must be [out, ", h.size(1), "], got ", w.sizes());
    return mm_onto_zeros(h, w.t());
  };
  auto input_grad = [&](int64_t l, const at::Tensor& dz) { return mm_onto_zeros(dz, weights[l]); };
  return mlp_backward(x, y, static_cast<int64_t>(weights.size()), forward, input_grad, weight_step);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_cross_entropy_grads_op(const at::Tensor& x, const at::Tensor& y,
                                                                           at::TensorList weights) {
  std::vector<at::Tensor> grads(weights.size());
  at::Tensor loss = mlp_backward(x, y, weights, [&](int64_t l, const at::Tensor& dz, const at::Tensor& input) {
    grads[l] = mm_onto_zeros(dz.t(), input);
  });
  return {loss, grads};
}

// x [B, I] (contiguous) packed into the 64-byte-aligned column panels the AVX-512 weight-gradient
// tiles read (wgrad_pack_x); `storage` keeps them alive.
const float* packed_wgrad_panels(const at::Tensor& x, at::Tensor& storage) {
  const int64_t B = x.size(0), I = x.size(1), ct = wgrad_tile_cols(), panels = (I + ct - 1) / ct;
  storage = at::empty({panels * B * ct + 16}, x.options());  // + 16: room to align to 64 bytes
  float* xpk = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data_ptr<float>()) + 63) & ~uintptr_t{63});
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t t0, int64_t t1) { wgrad_pack_x(xp, B, I, xpk, t0, t1); });
  return xpk;
}

// ste_rmsprop_step_ of one [O, I] layer with its weight gradient dzᵀ x (dz [B, O], x [B, I]): on
// AVX-512 formed tile by tile inside the step (wgrad_step.cpp), never stored; elsewhere BLAS's GEMM
// writes it into masked_weight, which the step then overwrites element by element (each read before
// it is written) with the next masked weight: no new [O, I] tensor per step (the AVX2 LeNet step on
// Zen 4: 1.00-1.04x faster, three interleaved A/B runs).
void ste_rmsprop_wgrad_step_op(const at::Tensor& dz, const at::Tensor& x, at::Tensor param, const at::Tensor& weight,
                               at::Tensor square_avg, at::Tensor masked_weight, double lr, double alpha, double eps,
                               double weight_decay) {
  check_float(dz, "dz");
  check_float(x, "x");
  TORCH_CHECK(dz.dim() == 2 && x.dim() == 2 && dz.size(0) == x.size(0), "dz must be [B, out] and x [B, in], got ",
              dz.sizes(), " and ", x.sizes());
  const int64_t B = x.size(0), O = dz.size(1), I = x.size(1);
  const std::pair<const at::Tensor*, const char*> state[] = {{&param, "param"}, {&weight, "weight"},
                                                             {&square_avg, "square_avg"}, {&masked_weight, "masked_weight"}};
  for (const auto& [t, name] : state) {
    check_float(*t, name);  // float32, CPU, contiguous
    TORCH_CHECK(t->dim() == 2 && t->size(0) == O && t->size(1) == I, name, " must be [", O, ", ", I, "], got ",
                t->sizes());
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&dz, "dz"}, {&x, "x"}, {&param, "param"},
                                {&weight, "weight"}, {&square_avg, "square_avg"}})
    TORCH_CHECK(!shares_memory(masked_weight, *t), "masked_weight must not share memory with ", name);
  if (current_isa() != Isa::Avx512 || B == 0) {
    masked_weight.zero_().addmm_(dz.t(), x);  // as mm_onto_zeros
    ste_rmsprop_step_op(param, masked_weight, weight, square_avg, masked_weight, lr, alpha, eps, weight_decay);
    return;
  }
  const float* dzp = dz.data_ptr<float>();  // both contiguous (check_float)
  at::Tensor packed;
  const float* xpk = packed_wgrad_panels(x, packed);
  float* p = param.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* s = square_avg.data_ptr<float>();
  float* out = masked_weight.data_ptr<float>();
  const RmspropScalars c = rmsprop_scalars(lr, alpha, eps, weight_decay);
  at::parallel_for(0, O, 8, [&](int64_t o0, int64_t o1) {
    ste_rmsprop_wgrad_avx512(dzp, xpk, B, O, I, p, w, s, out, c, o0, o1);
  });
}

// One straight-through RMSprop training step of such an MLP in one call: each layer's weight
// gradient is formed inside its fused update (ste_rmsprop_wgrad_step_), and masked_weights[l] is
// rewritten for the next step. Returns the loss (of the masked weights given).
at::Tensor mlp_ste_rmsprop_step_op(const at::Tensor& x, const at::Tensor& y, at::TensorList masked_weights,
                                   at::TensorList weights, at::TensorList params, at::TensorList square_avgs, double lr,
                                   double alpha, double eps, double weight_decay) {
  const size_t L = masked_weights.size();
  TORCH_CHECK(weights.size() == L && params.size() == L && square_avgs.size() == L,
              "masked_weights, weights, params and square_avgs must hold one tensor per layer");
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK(masked_weights[l].is_contiguous() && params[l].is_contiguous() && square_avgs[l].is_contiguous() &&
                    weights[l].is_contiguous(),
                "layer ", l, ": masked weight, weight, param and square_avg must be contiguous");
    TORCH_CHECK(weights[l].sizes() == masked_weights[l].sizes(), "weights[", l, "] must be shaped like masked_weights[", l, "]");
  }
  return mlp_backward(x, y, masked_weights, [&](int64_t l, const at::Tensor& dz, const at::Tensor& input) {
    ste_rmsprop_wgrad_step_op(dz, input, params[l], weights[l], square_avgs[l], masked_weights[l], lr, alpha, eps,
                              weight_decay);
  });
}

// mlp_ste_rmsprop_step_ for layers whose masks are kept as bits, never as a masked float weight:
// layer l's weight is weights[l] [out, in] (float), or, where sign_words[l] is given, the
// signed-constant scales[l] * (sign bit ? 1 : -1) with weights[l] giving only its shape. Its forward
// and input gradient unpack the bits inside the GEMM's packing (masked_gemm.cpp); its fused step
// reads the weight gradient tile by tile (AVX-512) or from BLAS's GEMM (elsewhere) and writes the
// next mask (params[l] >= 0) into mask_words[l]. Per step it moves two float arrays (scores,
// square_avg) and bits, against four and a masked weight for mlp_ste_rmsprop_step_.
at::Tensor mlp_ste_rmsprop_bits_step_op(const at::Tensor& x, const at::Tensor& y, at::TensorList weights,
                                        const c10::List<std::optional<at::Tensor>>& sign_words, at::ArrayRef<double> scales,
                                        at::TensorList mask_words, at::TensorList params, at::TensorList square_avgs,
                                        double lr, double alpha, double eps, double weight_decay) {
  const size_t L = weights.size();
  TORCH_CHECK(sign_words.size() == L && scales.size() == L && mask_words.size() == L && params.size() == L &&
                  square_avgs.size() == L,
              "weights, sign_words, scales, mask_words, params and square_avgs must hold one entry per layer");
  std::vector<FrozenWeight> frozen(L);
  std::vector<at::Tensor> signs(L);
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    check_float(w, "weights");
    TORCH_CHECK(w.dim() == 2, "weights[", l, "] must be [out, in], got ", w.sizes());
    const int64_t O = w.size(0), I = w.size(1), W = words_for(I);
    check_words(mask_words[l], "mask_words");
    TORCH_CHECK(mask_words[l].dim() == 2 && mask_words[l].size(0) == O && mask_words[l].size(1) == W,
                "mask_words[", l, "] must be [", O, ", ", W, "], got ", mask_words[l].sizes());
    for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&params[l], "params"}, {&square_avgs[l], "square_avgs"}}) {
      check_float(*t, name);
      TORCH_CHECK(t->sizes() == w.sizes(), name, "[", l, "] must be shaped like weights[", l, "]");
    }
    if (sign_words.get(l).has_value()) {
      signs[l] = *sign_words.get(l);
      check_words(signs[l], "sign_words");
      TORCH_CHECK(signs[l].sizes() == mask_words[l].sizes(), "sign_words[", l, "] must be shaped like mask_words[", l, "]");
      TORCH_CHECK(std::isfinite(scales[l]) && scales[l] > 0, "scales[", l, "] must be a positive number, got ", scales[l]);
    }
    frozen[l] = FrozenWeight{signs[l].defined() ? nullptr : w.data_ptr<float>(),
                             signs[l].defined() ? signs[l].data_ptr<int32_t>() : nullptr,
                             static_cast<float>(scales[l]), I, W};
  }
  const Isa isa = current_isa();
  auto forward = [&](int64_t l, const at::Tensor& h) {
    const FrozenWeight& fw = frozen[l];
    const int64_t O = weights[l].size(0), B = h.size(0);
    TORCH_CHECK(h.size(1) == fw.in_features, "weights[", l, "] must be [out, ", h.size(1), "], got ", weights[l].sizes());
    at::Tensor z = at::empty({B, O}, h.options());
    const float* hp = h.data_ptr<float>();
    const int32_t* mw = mask_words[l].data_ptr<int32_t>();
    float* zp = z.data_ptr<float>();
    at::parallel_for(0, O, 32, [&](int64_t r0, int64_t r1) {
      if (fw.sign_words) signed_masked_gemm(isa, hp, B, fw.sign_words, mw, fw.scale, fw.in_features, fw.words_per_row, O, nullptr, zp, r0, r1);
      else masked_gemm(isa, hp, B, fw.weight, mw, fw.in_features, fw.words_per_row, O, nullptr, zp, r0, r1);
    });
    return z;
  };
  auto input_grad = [&](int64_t l, const at::Tensor& dz) {
    const FrozenWeight& fw = frozen[l];
    const int64_t O = weights[l].size(0), I = fw.in_features, B = dz.size(0);
    at::Tensor dx = at::empty({B, I}, dz.options());
    const float* dp = dz.data_ptr<float>();
    const int32_t* mw = mask_words[l].data_ptr<int32_t>();
    float* xp = dx.data_ptr<float>();
    // columns in blocks of 32: the kernels read each row's bits from a word boundary
    at::parallel_for(0, words_for(I), 1, [&](int64_t q0, int64_t q1) {
      const int64_t c0 = 32 * q0, c1 = std::min(I, 32 * q1);
      if (fw.sign_words) signed_masked_gemm_rows(isa, dp, B, fw.sign_words, mw, fw.scale, O, fw.words_per_row, I, xp, c0, c1);
      else masked_gemm_rows(isa, dp, B, fw.weight, mw, O, fw.words_per_row, I, xp, c0, c1);
    });
    return dx;
  };
  const RmspropScalars c = rmsprop_scalars(lr, alpha, eps, weight_decay);
  auto weight_step = [&](int64_t l, const at::Tensor& dz, const at::Tensor& input) {
    const FrozenWeight& fw = frozen[l];
    const int64_t B = input.size(0), O = dz.size(1), I = input.size(1);
    float* p = params[l].data_ptr<float>();
    float* s = square_avgs[l].data_ptr<float>();
    int32_t* mw = mask_words[l].data_ptr<int32_t>();
    if (isa == Isa::Avx512 && B > 0) {
      const float* dzp = dz.data_ptr<float>();
      at::Tensor packed;
      const float* xpk = packed_wgrad_panels(input, packed);
      at::parallel_for(0, O, 8, [&](int64_t o0, int64_t o1) {
        ste_rmsprop_bits_wgrad_avx512(dzp, xpk, B, O, I, p, fw, s, mw, c, o0, o1);
      });
      return;
    }
    const at::Tensor grad = mm_onto_zeros(dz.t(), input);
    const float* g = grad.data_ptr<float>();
    at::parallel_for(0, O, 8, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) ste_rmsprop_bits_step(isa, p, g + o * I, fw, s, mw, c, o, 0, I);
    });
  };
  return mlp_backward(x, y, static_cast<int64_t>(L), forward, input_grad, weight_step);
}

at::Tensor threshold_masked_weight_op(const at::Tensor& scores, const at::Tensor& w) {
  check_float(scores, "scores");
  check_float(w, "weight");
  TORCH_CHECK(scores.sizes() == w.sizes(), "scores and weight must have the same shape");
  at::Tensor out = at::empty_like(w);
  const float* s = scores.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, w.numel(), 1 << 14, [&](int64_t i0, int64_t i1) { threshold_masked_weight(current_isa(), s, wp, o, i0, i1); });
  return out;
}

}  // namespace

TORCH_LIBRARY(supsup_cpu, m) {
  m.def("isa() -> str", &isa_op);
  m.def("stream_prefetch() -> bool", &stream_prefetch_op);
  m.def("stream_prefetch_l2() -> bool", &stream_prefetch_l2_op);
  m.def("shift_indices() -> bool", &shift_indices_op);
  m.def("wide_gemm_tiles() -> bool", &wide_gemm_tiles_op);
  m.def("short_gemm_chunks() -> bool", &short_gemm_chunks_op);
  m.def("signed_lut_max_rows() -> int", &signed_lut_max_rows_op);
  m.def("vendor() -> str", &vendor_op);
  m.def("pack_bits(Tensor mask) -> Tensor");
  m.def("unpack_bits(Tensor words, int n) -> Tensor");
  m.def("mask_dot(Tensor bank, Tensor v, Tensor? active=None) -> Tensor");
  m.def("scaled_linear_small(Tensor x, Tensor weight, Tensor s, Tensor? bias=None) -> Tensor");
  m.def("scaled_linear_small_t(Tensor grad, Tensor weight, Tensor s) -> Tensor");
  m.def("mask_dot_batched(Tensor bank, Tensor v, Tensor? active=None) -> Tensor");
  m.def("mask_dot_rank1(Tensor bank, Tensor g, Tensor x, Tensor weight, bool inputs_finite=False) -> Tensor");
  m.def("mask_dot_rows(Tensor bank, Tensor x, Tensor weight) -> Tensor");
  m.def("mask_dot_rows_interleaved(Tensor bank_t, int k, Tensor x, Tensor weight) -> Tensor");
  m.def("mask_dot_rank1_batched(Tensor bank, Tensor g, Tensor x, Tensor weight, Tensor? bank_t=None) -> Tensor");
  m.def("interleave_tasks(Tensor bank) -> Tensor");
  m.def("interleave_weights(Tensor bank, int n) -> Tensor");
  m.def("superpose_interleaved(Tensor bank_w, int k, Tensor alpha, int n) -> Tensor");
  m.def("mask_dot_rank1_interleaved(Tensor bank_t, int k, Tensor g, Tensor x, Tensor weight, bool inputs_finite=False) -> Tensor");
  m.def("transpose_masks(Tensor words, int n) -> Tensor");
  m.def("mlp_mask_dot_outer(Tensor[] banks, Tensor[] copies, bool[] transposed, Tensor[] weights, Tensor[] backward_weights, "
        "Tensor[] inputs, Tensor g) -> (Tensor, bool)");
  m.def("mlp_logit_gradients(Tensor x, Tensor[] weights, Tensor?[] biases, str objective, int num_labels) "
        "-> (Tensor[], Tensor, int[])");
  m.def("superpose(Tensor bank, Tensor alpha, int n, Tensor? active=None) -> Tensor");
  m.def("masked_weight(Tensor weight, Tensor mask_words) -> Tensor");
  m.def("masked_weight_into(Tensor weight, Tensor mask_words, Tensor(a!) out) -> ()");
  m.def("masked_linear_small(Tensor x, Tensor weight, Tensor mask_words, Tensor? bias=None) -> Tensor");
  m.def("signed_masked_linear_small(Tensor x, Tensor sign_words, Tensor mask_words, float scale, Tensor? bias=None) -> Tensor");
  m.def("masked_linear_gemm(Tensor x, Tensor weight, Tensor mask_words, Tensor? bias=None) -> Tensor");
  m.def("signed_masked_linear_gemm(Tensor x, Tensor sign_words, Tensor mask_words, float scale, Tensor? bias=None) -> Tensor");
  m.def("signed_masked_weight_into(Tensor sign_words, Tensor mask_words, float scale, Tensor(a!) out) -> ()");
  m.def("threshold_masked_weight(Tensor scores, Tensor weight) -> Tensor");
  m.def("rmsprop_step_(Tensor(a!) param, Tensor grad, Tensor(b!) square_avg, float lr, float alpha, float eps, float weight_decay) -> ()");
  m.def("ste_rmsprop_step_(Tensor(a!) param, Tensor weight_grad, Tensor weight, Tensor(b!) square_avg, Tensor(c!) masked_weight, "
        "float lr, float alpha, float eps, float weight_decay) -> ()");
  m.def("ste_rmsprop_wgrad_step_(Tensor dz, Tensor x, Tensor(a!) param, Tensor weight, Tensor(b!) square_avg, "
        "Tensor(c!) masked_weight, float lr, float alpha, float eps, float weight_decay) -> ()");
  m.def("mlp_ste_rmsprop_step_(Tensor x, Tensor y, Tensor(a!)[] masked_weights, Tensor[] weights, Tensor(b!)[] params, "
        "Tensor(c!)[] square_avgs, float lr, float alpha, float eps, float weight_decay) -> Tensor");
  m.def("mlp_cross_entropy_grads(Tensor x, Tensor y, Tensor[] weights) -> (Tensor, Tensor[])");
  m.def("mlp_ste_rmsprop_bits_step_(Tensor x, Tensor y, Tensor[] weights, Tensor?[] sign_words, float[] scales, "
        "Tensor(a!)[] mask_words, Tensor(b!)[] params, Tensor(c!)[] square_avgs, float lr, float alpha, float eps, "
        "float weight_decay) -> Tensor");
  m.def("ste_adam_step_(Tensor(a!) param, Tensor weight_grad, Tensor weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!) masked_weight, int step, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(supsup_cpu, CPU, m) {
  m.impl("pack_bits", &pack_bits_op);
  m.impl("unpack_bits", &unpack_bits_op);
  m.impl("mask_dot", &mask_dot_op);
  m.impl("superpose", &superpose_op);
  m.impl("scaled_linear_small", &scaled_linear_small_op);
  m.impl("scaled_linear_small_t", &scaled_linear_small_t_op);
  m.impl("mask_dot_batched", &mask_dot_batched_op);
  m.impl("mask_dot_rank1", &mask_dot_rank1_op);
  m.impl("mask_dot_rank1_batched", &mask_dot_rank1_batched_op);
  m.impl("interleave_tasks", &interleave_tasks_op);
  m.impl("interleave_weights", &interleave_weights_op);
  m.impl("superpose_interleaved", &superpose_interleaved_op);
  m.impl("mask_dot_rank1_interleaved", &mask_dot_rank1_interleaved_op);
  m.impl("transpose_masks", &transpose_masks_op);
  m.impl("mlp_mask_dot_outer", &mlp_mask_dot_outer_op);
  m.impl("mlp_logit_gradients", &mlp_logit_gradients_op);
  m.impl("mask_dot_rows", &mask_dot_rows_op);
  m.impl("mask_dot_rows_interleaved", &mask_dot_rows_interleaved_op);
  m.impl("masked_weight", &masked_weight_op);
  m.impl("masked_weight_into", &masked_weight_into_op);
  m.impl("masked_linear_small", &masked_linear_small);
  m.impl("signed_masked_linear_small", &signed_masked_linear_small);
  m.impl("masked_linear_gemm", &masked_linear_gemm_op);
  m.impl("signed_masked_linear_gemm", &signed_masked_linear_gemm_op);
  m.impl("rmsprop_step_", &rmsprop_step_op);
  m.impl("ste_rmsprop_step_", &ste_rmsprop_step_op);
  m.impl("ste_adam_step_", &ste_adam_step_op);
  m.impl("mlp_cross_entropy_grads", &mlp_cross_entropy_grads_op);
  m.impl("ste_rmsprop_wgrad_step_", &ste_rmsprop_wgrad_step_op);
  m.impl("mlp_ste_rmsprop_step_", &mlp_ste_rmsprop_step_op);
  m.impl("mlp_ste_rmsprop_bits_step_", &mlp_ste_rmsprop_bits_step_op);
  m.impl("threshold_masked_weight", &threshold_masked_weight_op);
  m.impl("signed_masked_weight_into", &signed_masked_weight_into_op);
}

}  // namespace supsup_cpu
