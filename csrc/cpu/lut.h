// Lookup-table (T-MAC style, "Four Russians") kernels for ⟨Mᵢ, v⟩ over a bank of packed masks.
// Per block of v, each group of G consecutive weights becomes a table of the 2^G subset sums of its
// values; a task's G mask bits are then an index into that table, so one table lookup replaces G
// masked adds. Lookups run for many tasks at once (16 per vector on AVX-512: vpermps over 16-entry
// tables of nibbles; 8 per vector on AVX2: vpermps ymm over 8-entry tables of 3-bit groups; one task
// at a time on the scalar ISA, over nibble or byte tables in plain C++: portable.h). The
// tables are fp32 subset sums, so the result is exact in fp32 up to summation order. Plain-pointer
// code, no torch header; callers split the flat word range across threads.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace supsup_cpu {

// out[j * k + t] = partial sum over the flat words [fw0, fw1) of the R*W words of a task of
// bit(bank[task(t), row, i]) * v_j[row, i], for queries j < q (v_j = v + j * q_stride, each [R, n])
// and tasks t < k. One pass over the bits serves all q queries (batched task inference).
void mask_dot_lut(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* v, int64_t q,
                  int64_t q_stride, const int64_t* active, int64_t k, float* out, int64_t fw0, int64_t fw1);

// The same for q queries whose v_j = (g_j x_jᵀ) ⊙ w is formed on the fly while the tables are built
// (g [q, R], x [q, n], w [R, n]): v is never materialised. With skip_zero_rows (for finite x and w
// only, where such rows add exactly zero) the rows r with g_j[r] == 0 are skipped: one query reads
// none of their bits, and batched queries look up only their own active rows.
void mask_dot_lut_rank1(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* g,
                        const float* x, const float* w, int64_t q, int64_t k, float* out, int64_t fw0, int64_t fw1,
                        bool skip_zero_rows);

// The same for 16 queries at once with the queries in the vector lanes (lut_lanes.cpp): nibble tables
// of the 16 subset sums of 4 weights per word, an entry holding 16 queries' sums, so a task's nibble
// is an address and one vector add serves 16 queries. gT [R, 16] and xT [n, 16] hold the queries'
// g and x with the query last; out[t * 16 + l] (k tasks) gains the sums over words [fw0, fw1).
// Only where lanes_available(isa) (AVX2, AVX-512).
constexpr int64_t kQueryLanes = 16;
bool lanes_available(Isa isa);
void mask_dot_rank1_lanes(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* gT,
                          const float* xT, const float* w, int64_t k, float* out, int64_t fw0, int64_t fw1);

// The task-interleaved copy of a bank (lut_interleaved.cpp): bank_t[f * kp + t] = bank[t * RW + f]
// for the RW = R * W words f of a task, tasks t < k, and zero for k <= t < kp (kp: k rounded up to
// 16). Flat words [fw0, fw1).
void interleave_tasks(const int32_t* bank, int64_t k, int64_t RW, int64_t kp, int32_t* bank_t, int64_t fw0, int64_t fw1);

// mask_dot_lut_rank1 over the task-interleaved copy, for q queries (g [q, R], x [q, n], w [R, n]):
// acc[j * kp + t] gains the sums over rows [r0, r1) for task t (entries t >= k gain zero). With
// skip_zero_rows (finite x and w only) a query's rows with g_j[r] == 0 are skipped whole.
void mask_dot_rank1_interleaved(Isa isa, const int32_t* bank_t, int64_t kp, int64_t R, int64_t W, int64_t n,
                                const float* g, const float* x, const float* w, int64_t q, float* acc, int64_t r0,
                                int64_t r1, bool skip_zero_rows);

// The weight-interleaved copy of a bank [k, R, W] of n-wide rows: bank_w[(r * KW + q) * np + c]
// holds, in bit i, weight (r, c)'s bit of task 32 q + i (KW = ceil(k/32); np = n rounded up to 16;
// zero for tasks past k and columns past n). Its words are the bank's bits transposed per 32 x 32
// block; 16 weights' words are one 64-byte vector. Rows [r0, r1).
void interleave_weights(const int32_t* bank, int64_t k, int64_t R, int64_t W, int64_t n, int64_t KW, int64_t np,
                        int32_t* bank_w, int64_t r0, int64_t r1);

// superpose read from that copy: out[r * n + c] = sum_t alpha[t] * bit(task t, r, c) for rows [r0, r1)
// (alpha [k]). The mask_dot_rank1_interleaved loop with tasks and weights swapped: tables of α's
// subset sums, 16 weights per lookup, as fast as mask_dot over the task-interleaved copy.
void superpose_interleaved(Isa isa, const int32_t* bank_w, int64_t k, int64_t KW, int64_t n, int64_t np,
                           const float* alpha, float* out, int64_t r0, int64_t r1);

// Every task's masked linear layer on one input, all at once: out[r * k + t] = sum over j of
// bit(bank[t, r, j]) * w[r, j] * x[j] for rows [r0, r1) (bank [k, R, W], w [R, n], x [n], out [R, k]).
// The tables of w ⊙ x are built once per block of rows and shared by all k tasks, as in mask_dot_lut.
void mask_dot_rows(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* x, const float* w,
                   int64_t k, float* out, int64_t r0, int64_t r1);

// mask_dot_rows read from the task-interleaved copy bank_t [R, W, kp] of a k-task bank
// (mask_dot_rank1_interleaved's loop, a row's sums kept apart): out[r * k + t], rows [r0, r1).
void mask_dot_rows_interleaved(Isa isa, const int32_t* bank_t, int64_t kp, int64_t W, int64_t n, const float* x,
                               const float* w, int64_t k, float* out, int64_t r0, int64_t r1);

// superpose (out[row, j] = sum_t alpha[t] * bit(bank[task(t), row, j]), rows [r0, r1)) by table
// lookups over bit transposes (superpose_lut.cpp); only where superpose_lut_available(isa): AVX2, and
// AVX-512 with GFNI and VBMI (unless SUPSUP_CPU_GFNI=0).
bool superpose_lut_available(Isa isa);
void superpose_lut(Isa isa, const int32_t* bank, int64_t k, int64_t W, int64_t n, int64_t R, const float* alpha,
                   const int64_t* active, float* out, int64_t r0, int64_t r1);

// AVX2 lookups take a 32-bit word in 3-bit groups: ten of 3 bits, the last of 2.
constexpr int kGroups3 = 11;

// Signed-constant weights (±scale where the mask is set) at up to signed_lut_max_rows(isa) rows of x
// by table lookups (signed_lut.cpp): y[b, r] = scale · (Σ x[b, j] over the set bits of mask ∧ sign −
// the same over mask ∧ ¬sign) + bias[r] for rows [r0, r1). The tables, signed_lut_table_floats(isa, B,
// W) floats 64-byte aligned, are built once per call by signed_lut_tables from xt [W][B][32] (x
// transposed and zero-padded per word: small_gemm.cpp transpose_small_batch) and shared by every row
// range. x must be finite (a clear bit adds nothing, where IEEE has 0·inf = NaN); padding bits add the
// padding's zeros. Any B, 4 rows of x a pass over the bits. AVX2 and AVX-512 only (isa not Scalar).
// signed_lut_max_rows: up to how many rows of x the small-batch op uses it: 4, 0 on the scalar ISA,
// or SUPSUP_CPU_SIGNED_LUT=N (0 turns it off, at most 16) in the environment.
int64_t signed_lut_max_rows(Isa isa);
int64_t signed_lut_table_floats(Isa isa, int64_t B, int64_t W);
void signed_lut_tables(Isa isa, const float* xt, int64_t B, int64_t W, float* tables);
void signed_gemv_lut(Isa isa, const float* tables, int64_t B, const int32_t* sign_words, const int32_t* mask_words,
                     float scale, int64_t W, int64_t R, const float* bias, float* y, int64_t r0, int64_t r1);

// g_r * (x[j] * w_row[j]) for the 32 columns j of word q of a row, zero past n: the values whose
// subset sums a rank-1 query's tables hold.
inline void rank1_values(float gr, const float* x, const float* w_row, int64_t n, int64_t q, float* vals) {
  const int64_t len = n - 32 * q < 32 ? n - 32 * q : 32;
  for (int64_t i = 0; i < len; ++i) vals[i] = gr * (x[32 * q + i] * w_row[32 * q + i]);
  for (int64_t i = len; i < 32; ++i) vals[i] = 0.0f;
}

// Lookups that a row's last word needs, its valid bits taken `bits` at a time (full: a whole word's).
// Where that saves an eighth of a row's lookups or more (a 100-wide row's last word holds 4 bits: one
// nibble of eight, 22 % of the row), the kernels skip the rest, whose tables hold only padding's
// zeros. Below that the test in the inner loop costs more than it saves (784-wide rows, 2 % of the
// lookups: 2-5 % slower on Zen 4), and every word takes the full lookup.
inline int tail_lookups(int64_t n, int64_t W, int bits, int full) {
  const int need = static_cast<int>((n - 32 * (W - 1) + bits - 1) / bits);
  return 8 * (full - need) >= W * full ? need : full;
}

// Bit j set where flat word fw + j (j < len <= 32) is the last word of its row.
inline uint32_t tail_words(int64_t W, int64_t fw, int64_t len) {
  uint32_t m = 0;
  for (int64_t e = (fw / W + 1) * W - 1; e < fw + len; e += W) m |= 1u << (e - fw);
  return m;
}

}  // namespace supsup_cpu
