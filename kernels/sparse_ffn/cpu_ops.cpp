// torch ops over the native CPU kernel (cpu_native.c), for the calls a decode step makes once or twice per
// layer: `blockffn_native::linear` and `::int8_linear` (the streaming GEMV of the attention projections and
// the lm_head), `::router_experts` (the layer's router and sparse experts in one kernel call) and
// `::attention` (vLLM's CPU attention kernels for one layer, the step's metadata published once).
//
// Why C++: the same call as a Python custom op runs the dispatcher's Python trampoline, a few Python
// frames and a ctypes call with 14 converted arguments, ~19 µs per call with the caches the weight
// stream just flushed (~70 calls per step of an XLarge-sized model: 1.3 ms of a 54 ms step;
// benchmarks/RESULTS.md). Here a call is the dispatcher, a tensor allocation and a C call.
//
// The kernel's entry points come from the already loaded kernel (cpu_ops.py passes their addresses
// to blockffn_ops_bind once): this object does not link against it, so one kernel build serves
// both, and a compiled graph refers to the op by name only (no addresses in cached graphs).
// The rules for which sizes take the kernel are kernels/dispatch.py's, bound with it; they mirror
// cpu_ops.py's native_rows / linear_python / int8_linear_python, the Python implementations of these ops
// on machines where this file cannot be built.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {

using linear_fn = int (*)(const void *x, long ldx, int xdt, const void *w, int wdt, long M, long N, long K,
                          void *y, long ldy, int nthreads, int isa, const float *scale, const int32_t *rowsum);
using kmajor_fn = int (*)(const void *x, long ldx, int xdt, const void *wp, long M, long N, long K, void *y, long ldy,
                         int nthreads, int isa);
using kmajor_i8_fn = int (*)(const void *x, long ldx, int xdt, const void *wp, long M, long N, long K, void *y,
                            long ldy, int nthreads, int isa, const float *scale, const int32_t *rowsum);
using resolve_fn = int (*)(int isa);
using router_fn = int (*)(const void *x, long ldx, int xdt, const void *w_r, int wdt_r, const float *norm_w, float eps,
                          const void *w_up, const void *w_down, int wdt, const int32_t *cu, long S, long T, long E,
                          long D, long H, void *y, int nthreads, float up_row_cost, int allow_dense,
                          long min_dense_tokens, float max_pair_fraction, int64_t *stats, int isa,
                          const float *up_scale, const float *down_scale, const int32_t *up_rowsum);

constexpr int N_ISA = 5;  // cpu_native.c's ISA codes 0..4 (cpu_native.ISAS)

struct Bound {
  linear_fn linear = nullptr;
  kmajor_fn kmajor = nullptr;
  kmajor_fn kmajor_f32 = nullptr;
  kmajor_i8_fn kmajor_i8 = nullptr;
  resolve_fn resolve = nullptr;
  router_fn router = nullptr;
  float up_row_cost = 3.0f;       // cpu_native.UP_ROW_COST
  int64_t min_dense_tokens = 0;   // THRESHOLDS.cpu_min_dense_tokens (passed; the fused route never goes dense)
  float max_pair_fraction = 1.0f; // THRESHOLDS.cpu_max_pair_fraction
  int threads = 0;
  int64_t max_rows = 0;       // THRESHOLDS.cpu_linear_max_tokens (decode sizes: the kernel on every path)
  int64_t rows[N_ISA][3] = {}; // THRESHOLDS.cpu_linear_rows by ISA code: fp32 kernel max, bf16 kernel max, bf16 widened from
  int64_t widen_rows = 512;    // cpu_ops.WIDEN_ROWS
  int64_t kmajor_widen[N_ISA] = {}; // THRESHOLDS.cpu_linear_kmajor_widen_min_tokens by ISA code (NEVER: none)
};
Bound g;

int dtype_code(at::ScalarType t) {
  return t == at::kFloat ? 0 : t == at::kBFloat16 ? 1 : t == at::kChar ? 2 : -1;
}

// the path calls run with now ($VLLM_BLOCKFFN_CPU_ISA is read by the kernel on every call)
int isa_now() {
  int isa = g.resolve(-1);
  TORCH_CHECK_VALUE(isa >= 0, "VLLM_BLOCKFFN_CPU_ISA names no kernel path; expected 'auto' or one of "
                    "['portable', 'avx2', 'avx512', 'avx512_bf16', 'amx']");
  return isa;
}

// cpu_ops.widened_linear: bf16 x Wᵀ through oneDNN's fp32 GEMM, widen_rows weight rows widened at a time
at::Tensor widened_linear(const at::Tensor &x, const at::Tensor &weight) {
  const int64_t N = weight.size(0);
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += g.widen_rows) {
    const int64_t nb = std::min(g.widen_rows, N - n0);
    y.narrow(1, n0, nb).copy_(at::linear(xf, weight.narrow(0, n0, nb).to(at::kFloat)));
  }
  return y;
}

// cpu_ops.widened_linear_kmajor: widened_linear on a bf16 weight packed K-major ([N / 16, K / 2, 16, 2]), each block
// of widen_rows rows unpacked to fp32 [rows, K] first: the same fp32 weights, so widened_linear's bits
at::Tensor widened_linear_kmajor(const at::Tensor &x, const at::Tensor &packed) {
  const int64_t N = packed.size(0) * 16, G = packed.size(1), K = 2 * G;
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  at::Tensor wf = at::empty({std::min(g.widen_rows, N), K}, xf.options());
  const uint32_t *p = static_cast<const uint32_t *>(packed.data_ptr());  // a line: 16 rows x 2 bf16, as u32 pairs
  float *o = wf.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += g.widen_rows) {
    const int64_t nb = std::min(g.widen_rows, N - n0);
    at::parallel_for(0, nb / 16, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; b++) {
        const uint32_t *blk = p + (n0 / 16 + b) * G * 16;
        float *rows = o + b * 16 * K;
        for (int64_t q = 0; q < G; q++)  // line by line (one read stream; 16 rows of fp32, 115 KB at K = 1792, in L2)
          for (int r = 0; r < 16; r++) {
            const uint32_t v = blk[q * 16 + r];  // elements 2q and 2q + 1 of row r, as bf16 bits
            const uint64_t f = (uint64_t)(v & 0xFFFF0000u) << 32 | (uint64_t)(v << 16);
            std::memcpy(rows + r * K + 2 * q, &f, 8);
          }
      }
    });
    y.narrow(1, n0, nb).copy_(at::linear(xf, wf.narrow(0, 0, nb)));
  }
  return y;
}

at::Tensor run(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &weight_scale,
               const std::optional<at::Tensor> &row_sums) {
  TORCH_CHECK(g.linear != nullptr, "blockffn_native::linear: the native CPU kernel is not bound");
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "linear: x ", x.sizes(),
                    " and weight ", weight.sizes(), "; expected x [M, ", weight.dim() == 2 ? weight.size(1) : -1,
                    "] and a 2-D weight [N, K]");
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  const int xdt = dtype_code(x.scalar_type()), wdt = dtype_code(weight.scalar_type());
  const bool float_x = xdt == 0 || xdt == 1;
  const float *scale = nullptr;
  const int32_t *rowsum = nullptr;
  if (wdt == 2) {  // int8 weights with fp32 per-row scales (quantization.int8_linear)
    TORCH_CHECK_VALUE(weight_scale.has_value() && weight_scale->scalar_type() == at::kFloat &&
                          weight_scale->dim() == 1 && weight_scale->size(0) == N && weight_scale->is_contiguous(),
                      "weight_scale: expected contiguous torch.float32 [", N, "] for an int8 weight [", N, ", ", K,
                      "]");
    if (!float_x) {  // the kernel at every M for fp32/bf16 x (cpu_ops.int8_linear_python says why)
      // torch's weight-only int8 GEMM on unit scales, the fp32 row scales applied to its output
      at::Tensor y = at::_weight_int8pack_mm(x.contiguous(), weight, at::ones({N}, x.options()));
      return (y.to(at::kFloat) * *weight_scale).to(x.scalar_type());
    }
    TORCH_CHECK_VALUE(row_sums.has_value() && row_sums->scalar_type() == at::kInt && row_sums->dim() == 1 &&
                          row_sums->size(0) == N && row_sums->is_contiguous(),
                      "row_sums: expected contiguous torch.int32 [", N, "] (cpu_native.int8_row_sums)");
    scale = weight_scale->data_ptr<float>();
    rowsum = row_sums->data_ptr<int32_t>();
  } else {
    TORCH_CHECK_VALUE(!weight_scale.has_value(), "linear: weight ", weight.scalar_type(),
                      " with a weight_scale; int8 weights take int8_linear");
    // cpu_ops.native_rows / widened_rows: decode sizes on every path; past them the path's rows: the kernel up
    // to the dtype's max, bf16 widened to fp32 GEMMs from the third entry
    bool native = float_x && xdt == wdt && M <= g.max_rows;
    if (!native && float_x && xdt == wdt) {  // the path is looked up only past decode sizes, once
      const int64_t *r = g.rows[isa_now()];
      if (xdt == 1 && M >= r[2]) return widened_linear(x, weight);
      native = M <= r[xdt == 1 ? 1 : 0];
    }
    if (!native) return at::linear(x, weight);
  }
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const int rc = g.linear(xc.data_ptr(), xc.stride(0), xdt, wc.data_ptr(), wdt, M, N, K, y.data_ptr(), N, g.threads,
                          -1, scale, rowsum);
  if (rc == -3) isa_now();  // raises, naming the variable
  TORCH_CHECK_VALUE(rc != -2, "blockffn linear CPU kernel: bad arguments (x ", x.sizes(), ", weight ",
                    weight.sizes(), ")");
  TORCH_CHECK(rc == 0, "blockffn linear CPU kernel: out of memory");
  return y;
}

at::Tensor linear(const at::Tensor &x, const at::Tensor &weight) { return run(x, weight, std::nullopt, std::nullopt); }

// bf16 weights packed K-major at load (layout.pack_kmajor, [N / 16, K / 2, 16, 2]): the kernel's outer-product
// linear at every M (cpu_ops.linear_kmajor_python says why), but bf16 x past decode sizes from the path's
// kmajor_widen rows (avx2: oneDNN has no bf16 GEMM there, its fp32 GEMM on widened blocks outruns the kernel).
// fp32 weights ([N / 16, K, 16, 1]): the kernel at every M (cpu_ops.kmajor_widened_rows says why)
at::Tensor linear_kmajor(const at::Tensor &x, const at::Tensor &packed) {
  TORCH_CHECK(g.kmajor != nullptr && g.kmajor_f32 != nullptr,
              "blockffn_native::linear_kmajor: the native CPU kernel is not bound");
  const bool f32 = packed.scalar_type() == at::kFloat;
  TORCH_CHECK_VALUE(packed.dim() == 4 && (f32 || packed.scalar_type() == at::kBFloat16) && packed.size(2) == 16 &&
                        packed.size(3) == (f32 ? 1 : 2) && packed.is_contiguous(),
                    "linear_kmajor: packed weight ", packed.scalar_type(), " ", packed.sizes(),
                    "; expected a contiguous torch.float32 [N / 16, K, 16, 1] or torch.bfloat16 [N / 16, K / 2, 16, 2] "
                    "(layout.pack_kmajor)");
  const int64_t N = packed.size(0) * 16, K = packed.size(1) * (f32 ? 1 : 2);
  const int xdt = dtype_code(x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == K && (xdt == 0 || xdt == 1), "linear_kmajor: x ", x.scalar_type(),
                    " ", x.sizes(), "; expected fp32/bf16 [M, ", K, "] for the packed weight [", N, ", ", K, "]");
  if (!f32 && xdt == 1 && x.size(0) > g.max_rows && x.size(0) >= g.kmajor_widen[isa_now()])
    return widened_linear_kmajor(x, packed);
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  const int rc = (f32 ? g.kmajor_f32 : g.kmajor)(xc.data_ptr(), xc.stride(0), xdt, packed.data_ptr(), x.size(0), N,
                                                  K, y.data_ptr(), N, g.threads, -1);
  if (rc == -3) isa_now();  // raises, naming the variable
  TORCH_CHECK_VALUE(rc != -2, "blockffn linear_kmajor CPU kernel: bad arguments (x ", x.sizes(), ", packed ",
                    packed.sizes(), ")");
  TORCH_CHECK(rc == 0, "blockffn linear_kmajor CPU kernel: out of memory");
  return y;
}

// int8 weights packed K-major at load ([N / 16, K / 4, 16, 4], quantization.py on the VNNI path) with their fp32 row
// scales and the row-major weight's row sums: the kernel's outer-product int8 linear at every M (as int8_linear's
// row-major kernel), fp32/bf16 x.
at::Tensor int8_linear_kmajor(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &weight_scale,
                              const at::Tensor &row_sums) {
  TORCH_CHECK(g.kmajor_i8 != nullptr, "blockffn_native::int8_linear_kmajor: the native CPU kernel is not bound");
  TORCH_CHECK_VALUE(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.size(2) == 16 &&
                        packed.size(3) == 4 && packed.is_contiguous(),
                    "int8_linear_kmajor: packed weight ", packed.scalar_type(), " ", packed.sizes(),
                    "; expected a contiguous torch.int8 [N / 16, K / 4, 16, 4] (layout.pack_kmajor)");
  const int64_t N = packed.size(0) * 16, K = packed.size(1) * 4;
  const int xdt = dtype_code(x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == K && (xdt == 0 || xdt == 1), "int8_linear_kmajor: x ",
                    x.scalar_type(), " ", x.sizes(), "; expected fp32/bf16 [M, ", K, "] for the packed weight [", N,
                    ", ", K, "]");
  TORCH_CHECK_VALUE(weight_scale.scalar_type() == at::kFloat && weight_scale.dim() == 1 && weight_scale.size(0) == N &&
                        weight_scale.is_contiguous() && row_sums.scalar_type() == at::kInt && row_sums.dim() == 1 &&
                        row_sums.size(0) == N && row_sums.is_contiguous(),
                    "int8_linear_kmajor: weight_scale ", weight_scale.sizes(), ", row_sums ", row_sums.sizes(),
                    "; expected contiguous float32 [", N, "] and int32 [", N, "] (cpu_native.int8_row_sums)");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  const int rc = g.kmajor_i8(xc.data_ptr(), xc.stride(0), xdt, packed.data_ptr(), x.size(0), N, K, y.data_ptr(), N,
                             g.threads, -1, weight_scale.data_ptr<float>(), row_sums.data_ptr<int32_t>());
  if (rc == -3) isa_now();  // raises, naming the variable
  TORCH_CHECK_VALUE(rc != -2, "blockffn int8_linear_kmajor CPU kernel: bad arguments (x ", x.sizes(), ", packed ",
                    packed.sizes(), ")");
  TORCH_CHECK(rc == 0, "blockffn int8_linear_kmajor CPU kernel: out of memory");
  return y;
}

at::Tensor int8_linear(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &weight_scale,
                       const at::Tensor &row_sums) {
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kChar, "int8_linear: weight ", weight.scalar_type(),
                    "; expected torch.int8");
  return run(x, weight, weight_scale, row_sums);
}

// The layer's router and experts (BlockFFN._fuses_router) for decode-size steps: one call of the kernel's
// blockffn_router_sparse_ffn, as NativeExperts.with_router makes it. `segments` is the step's request
// layout as blockffn_publish_segments wrote it once per step (int32: [tokens, S, cu_0 .. cu_S]; S = 0 when
// no layout is known): used when it was written for this many tokens, else the whole batch is one
// segment and no counters are added (as blockffn.py's _cpu_segments). `stats`: the layer's int64 [5]
// counter row (observe/stats.py), added to when `record`. Longer steps (prefill) go to the Python op
// vllm::blockffn_router_experts, which runs them as torch ops and grouped GEMMs.
at::Tensor router_experts(const at::Tensor &x, const at::Tensor &w_router, const at::Tensor &norm_w, double eps,
                          const at::Tensor &w_up, const at::Tensor &w_down_t, const at::Tensor &segments,
                          const std::optional<at::Tensor> &stats, const std::optional<at::Tensor> &up_scale,
                          const std::optional<at::Tensor> &down_scale, const std::optional<at::Tensor> &up_row_sums,
                          c10::string_view backend, int64_t layer_id, int64_t expert_bytes, bool record) {
  TORCH_CHECK(g.router != nullptr, "blockffn_native::router_experts: the native CPU kernel is not bound");
  const int64_t T = x.dim() == 2 ? x.size(0) : -1;
  if (T > g.max_rows) {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("vllm::blockffn_router_experts", "");
    torch::jit::Stack st{x, w_router, norm_w, eps, w_up, w_down_t, std::string(backend), layer_id, expert_bytes,
                         record, up_scale, down_scale};
    op.callBoxed(&st);
    return st[0].toTensor();
  }
  // experts packed K-major at load (layout.pack_experts_kmajor): w_up [E, D/16, H/g, 16, g], w_down_t
  // [E, H/16, D/g, 16, g], g = 4 int8 (the kernel's weight code 3), 2 bf16 (code 4), 1 fp32 (code 5)
  const bool packed = w_up.dim() == 5;
  const at::ScalarType wt = w_up.scalar_type();
  const int64_t grp = wt == at::kChar ? 4 : wt == at::kBFloat16 ? 2 : wt == at::kFloat ? 1 : 0;
  const int64_t E = w_up.size(0), D = packed ? w_up.size(1) * 16 : w_up.dim() == 3 ? w_up.size(1) : -1,
                H = packed ? w_up.size(2) * grp : w_up.dim() == 3 ? w_up.size(2) : -1;
  TORCH_CHECK_VALUE(packed ? grp > 0 && w_up.size(3) == 16 && w_up.size(4) == grp &&
                                 w_down_t.scalar_type() == w_up.scalar_type() && w_down_t.dim() == 5 &&
                                 w_down_t.size(0) == E && w_down_t.size(1) * 16 == H && w_down_t.size(2) * grp == D
                           : w_up.dim() == 3 && w_down_t.sizes() == w_up.sizes(),
                    "sparse_ffn: w_up ", w_up.sizes(), ", w_down_t ", w_down_t.sizes(),
                    "; expected both [E, D, H], or fp32 / bf16 / int8 packed by layout.pack_experts_kmajor");
  TORCH_CHECK_VALUE(T >= 0 && x.size(1) == H, "sparse_ffn: x ", x.sizes(), " for experts [E, D, H] = ", w_up.sizes(),
                    "; expected x [T, ", H, "]");
  const int xdt = dtype_code(x.scalar_type()), wdt = packed ? (grp == 4 ? 3 : grp == 2 ? 4 : 5) : dtype_code(wt);
  TORCH_CHECK_VALUE((xdt == 0 || xdt == 1) && wdt >= 0 && w_down_t.scalar_type() == w_up.scalar_type(),
                    "sparse_ffn: x ", x.scalar_type(), ", experts ", w_up.scalar_type(), "/", w_down_t.scalar_type(),
                    "; expected fp32/bf16 x and fp32, bf16 or int8 experts of one dtype");
  const int64_t sums = packed ? E * (D + H) : E * D;  // W_up's row sums, then W_down's when packed
  TORCH_CHECK_VALUE(w_router.scalar_type() == x.scalar_type() && w_router.dim() == 2 && w_router.size(0) == E &&
                        w_router.size(1) == H && norm_w.dim() == 1 && norm_w.size(0) == E,
                    "router: w_router ", w_router.scalar_type(), " ", w_router.sizes(), ", norm_w ", norm_w.sizes(),
                    "; expected ", x.scalar_type(), " [", E, ", ", H, "] and [", E, "]");
  const float *su = nullptr, *sd = nullptr;
  const int32_t *rs = nullptr;
  if (wdt == 2 || wdt == 3) {
    TORCH_CHECK_VALUE(up_scale.has_value() && down_scale.has_value() && up_row_sums.has_value() &&
                          up_scale->scalar_type() == at::kFloat && down_scale->scalar_type() == at::kFloat &&
                          up_row_sums->scalar_type() == at::kInt && up_scale->numel() == E * D &&
                          down_scale->numel() == E * H && up_row_sums->numel() == sums && up_scale->is_contiguous() &&
                          down_scale->is_contiguous() && up_row_sums->is_contiguous(),
                      "int8 experts: expected contiguous up_scale float32 [", E, ", ", D, "], down_scale float32 [", E,
                      ", ", H, "] and up_row_sums int32 [", sums, "] (cpu_native.expert_row_sums)");
    su = up_scale->data_ptr<float>();
    sd = down_scale->data_ptr<float>();
    rs = up_row_sums->data_ptr<int32_t>();
  }
  TORCH_CHECK_VALUE(segments.scalar_type() == at::kInt && segments.dim() == 1 && segments.is_contiguous(),
                    "segments: ", segments.scalar_type(), " ", segments.sizes(), "; expected contiguous int32 [n]");
  const int32_t *seg = segments.data_ptr<int32_t>();
  const int64_t n = segments.numel();
  int32_t whole[2] = {0, static_cast<int32_t>(T)};
  const int32_t *cu = whole;
  long S = 1;
  int64_t *counters = nullptr;
  if (n >= 4 && seg[0] == T && seg[1] >= 1 && seg[1] + 3 <= n) {  // this step's request layout
    cu = seg + 2;
    S = seg[1];
    if (record && stats.has_value()) {
      TORCH_CHECK_VALUE(stats->scalar_type() == at::kLong && stats->numel() == 5 && stats->is_contiguous(),
                        "stats: expected the layer's contiguous int64 [5] counter row");
      counters = stats->data_ptr<int64_t>();
    }
  }
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor wr = w_router.contiguous(), wu = w_up.contiguous(), wd = w_down_t.contiguous();
  // the norm weight in fp32 (the kernel's operand), converted here without an ATen op: E values
  thread_local std::vector<float> norm;
  norm.resize(E);
  const at::Tensor nw = norm_w.contiguous();
  TORCH_CHECK_VALUE(nw.scalar_type() == at::kFloat || nw.scalar_type() == at::kBFloat16, "router: norm_w ",
                    nw.scalar_type(), "; expected float32 or bfloat16");
  if (nw.scalar_type() == at::kFloat) {
    std::memcpy(norm.data(), nw.data_ptr<float>(), E * sizeof(float));
  } else {
    const uint16_t *b = reinterpret_cast<const uint16_t *>(nw.data_ptr());
    for (int64_t e = 0; e < E; e++) {
      const uint32_t bits = static_cast<uint32_t>(b[e]) << 16;
      std::memcpy(&norm[e], &bits, sizeof(float));
    }
  }
  at::Tensor y = at::empty({T, H}, x.options());
  const int rc = g.router(xc.data_ptr(), xc.stride(0), xdt, wr.data_ptr(), xdt, norm.data(),
                          static_cast<float>(eps), wu.data_ptr(), wd.data_ptr(), wdt, cu, S, T, E, D, H, y.data_ptr(),
                          g.threads, g.up_row_cost, 0, g.min_dense_tokens, g.max_pair_fraction, counters, -1, su, sd,
                          rs);
  if (rc == -3) isa_now();  // raises, naming the variable
  TORCH_CHECK_VALUE(rc != -2, "blockffn router + sparse_ffn CPU kernel: bad arguments (x ", x.sizes(), ", w_up ",
                    w_up.sizes(), ")");
  TORCH_CHECK(rc == 0, "blockffn router + sparse_ffn CPU kernel: out of memory");
  return y;
}

// ---- attention: vLLM's CPU attention kernels for one layer in one call ----------------------------------
// vLLM runs a layer's attention as two Python custom ops (unified_kv_cache_update, then
// unified_attention_with_output), each looking up the forward context, the layer and its metadata and
// calling the kernel through a Python wrapper: ~90 µs a layer between the qkv linear and the attention
// kernel, 3 ms of an XLarge-sized decode step (benchmarks/RESULTS.md). Here the model publishes the step's
// metadata once (serving/layers/cpu_attention.py, from the step's first op) and each layer makes one call:
// vLLM's own two kernels (_C::cpu_attn_reshape_and_cache, _C::cpu_attention_with_kv_cache) with the
// arguments CPUAttentionBackendImpl passes them, for the layers it installs on (decoder attention,
// "auto" KV cache, no ALiBi, sinks, KV sharing or KV transfer).

struct AttnLayer {  // static per layer: published when the model's KV caches are (re)bound
  at::Tensor key_cache, value_cache;  // views of the layer's cache [blocks, kv_heads, block_size, head]
  std::string isa;
  double scale = 1.0, softcap = 0.0, k_scale = 1.0, v_scale = 1.0;
  int64_t sliding_window = -1;
};
struct AttnStep {  // one per distinct metadata object of a step (normally one: one KV cache group)
  at::Tensor query_start_loc, seq_lens, block_table, scheduler_metadata, slot_mapping;
  std::optional<at::Tensor> dynamic_causal;
  int64_t num_actual_tokens = 0;
  bool causal = true, has_slots = false;
};
struct AttnModel {
  const void *key = nullptr;  // the model's layout buffer (the `step` tensor every layer's call takes)
  std::vector<AttnLayer> layers;
  std::vector<AttnStep> sets;
  std::vector<int64_t> layer_set;  // per layer: its entry in `sets`, -1 = no metadata (warm-up, profiling)
};
std::vector<AttnModel> models;  // one per live model of the process (normally one)

AttnModel &model_for(const at::Tensor &step, bool create) {
  for (auto &m : models)
    if (m.key == step.data_ptr()) return m;
  TORCH_CHECK(create, "blockffn_native::attention: no attention published for this model's step buffer "
              "(serving/layers/cpu_attention.py publishes it once per step)");
  models.emplace_back();
  models.back().key = step.data_ptr();
  return models.back();
}

// kv_caches[i]: layer i's cache [blocks, kv_heads, block_size, 2 * head]; params: 5 per layer (scale,
// sliding_window, softcap, k_scale, v_scale).
void attention_layers(const at::Tensor &step, at::TensorList kv_caches, const std::vector<std::string> &isas,
                      at::ArrayRef<double> params) {
  const size_t n = kv_caches.size();
  TORCH_CHECK_VALUE(isas.size() == n && params.size() == 5 * n, "attention_layers: ", n, " kv_caches, ",
                    isas.size(), " isas, ", params.size(), " params; expected ", n, ", ", n, " and ", 5 * n);
  AttnModel &m = model_for(step, true);
  m.layers.assign(n, AttnLayer{});
  m.layer_set.assign(n, -1);
  m.sets.clear();
  for (size_t i = 0; i < n; i++) {
    const at::Tensor &c = kv_caches[i];
    AttnLayer &l = m.layers[i];
    if (c.numel() > 0) {  // vLLM binds the caches after the model is built (an empty tensor until then)
      TORCH_CHECK_VALUE(c.dim() == 4 && c.size(3) % 2 == 0, "attention_layers: kv_caches[", i, "] ", c.sizes(),
                        "; expected [blocks, kv_heads, block_size, 2 * head_size]");
      // as CPUAttentionBackendImpl: [blocks, kv_heads, block_size * 2, head] split in two along dim 2
      auto kv = c.view({c.size(0), c.size(1), c.size(2) * 2, -1}).chunk(2, 2);
      l.key_cache = kv[0];
      l.value_cache = kv[1];
    }
    l.isa = isas[i];
    l.scale = params[5 * i];
    l.sliding_window = static_cast<int64_t>(params[5 * i + 1]);
    l.softcap = params[5 * i + 2];
    l.k_scale = params[5 * i + 3];
    l.v_scale = params[5 * i + 4];
  }
}

// meta: 6 tensors per set (query_start_loc, seq_lens, block_table, scheduler_metadata, slot_mapping,
// dynamic_causal; an empty tensor stands for None); ints: per set (num_actual_tokens, causal, has_slots,
// has_dynamic_causal), then one set index per layer (-1: no metadata this step).
void attention_step(const at::Tensor &step, at::TensorList meta, at::IntArrayRef ints) {
  AttnModel &m = model_for(step, false);
  const size_t sets = meta.size() / 6, n = m.layers.size();
  TORCH_CHECK_VALUE(meta.size() == 6 * sets && ints.size() == 4 * sets + n, "attention_step: ", meta.size(),
                    " tensors and ", ints.size(), " ints for ", n, " layers; expected 6 per set and 4 per set + ", n);
  m.sets.assign(sets, AttnStep{});
  for (size_t s = 0; s < sets; s++) {
    AttnStep &a = m.sets[s];
    a.query_start_loc = meta[6 * s];
    a.seq_lens = meta[6 * s + 1];
    a.block_table = meta[6 * s + 2];
    a.scheduler_metadata = meta[6 * s + 3];
    a.slot_mapping = meta[6 * s + 4];
    if (ints[4 * s + 3]) a.dynamic_causal = meta[6 * s + 5];
    a.num_actual_tokens = ints[4 * s];
    a.causal = ints[4 * s + 1] != 0;
    a.has_slots = ints[4 * s + 2] != 0;
  }
  for (size_t i = 0; i < n; i++) {
    const int64_t s = ints[4 * sets + i];
    TORCH_CHECK_VALUE(s >= -1 && s < static_cast<int64_t>(sets), "attention_step: layer ", i, " names set ", s,
                      " of ", sets);
    m.layer_set[i] = s;
  }
}

void attention_release(const at::Tensor &step) {
  for (size_t i = 0; i < models.size(); i++)
    if (models[i].key == step.data_ptr()) {
      models.erase(models.begin() + i);
      return;
    }
}

// One layer: the KV cache update, then attention over the cache (CPUAttentionBackendImpl.do_kv_cache_update
// and .forward for decoder layers). No metadata this step (warm-up, profiling): nothing, as vLLM.
void attention(const at::Tensor &query, const at::Tensor &key, const at::Tensor &value, at::Tensor &output,
               const at::Tensor &step, int64_t layer) {
  AttnModel &m = model_for(step, false);
  TORCH_CHECK_VALUE(layer >= 0 && layer < static_cast<int64_t>(m.layers.size()), "blockffn_native::attention: layer ",
                    layer, " of a model with ", m.layers.size(), " published attention layers");
  const int64_t s = m.layer_set[layer];
  if (s < 0) return;
  const AttnStep &a = m.sets[s];
  const AttnLayer &l = m.layers[layer];
  TORCH_CHECK(l.key_cache.defined(), "blockffn_native::attention: layer ", layer,
              " has step metadata but no KV cache bound");
  static const c10::OperatorHandle update =
      c10::Dispatcher::singleton().findSchemaOrThrow("_C::cpu_attn_reshape_and_cache", "");
  static const c10::OperatorHandle attend =
      c10::Dispatcher::singleton().findSchemaOrThrow("_C::cpu_attention_with_kv_cache", "");
  const std::string kv_dtype = "auto";
  if (a.has_slots) {
    torch::jit::Stack st{key, value, l.key_cache, l.value_cache, a.slot_mapping, l.isa, l.k_scale, l.v_scale,
                         kv_dtype};
    update.callBoxed(&st);
  }
  const int64_t t = a.num_actual_tokens;
  const bool whole = t >= query.size(0);
  torch::jit::Stack st{whole ? query : query.narrow(0, 0, t),
                       l.key_cache,
                       l.value_cache,
                       whole ? output : output.narrow(0, 0, t),
                       a.query_start_loc,
                       a.seq_lens,
                       l.scale,
                       a.causal,
                       c10::IValue(),
                       l.sliding_window,
                       a.block_table,
                       l.softcap,
                       a.scheduler_metadata,
                       c10::IValue(),
                       a.dynamic_causal.has_value() ? c10::IValue(*a.dynamic_causal) : c10::IValue(),
                       l.k_scale,
                       l.v_scale,
                       kv_dtype};
  attend.callBoxed(&st);
}

}  // namespace

extern "C" int blockffn_ops_bind_experts(void *router, float up_row_cost, long min_dense_tokens,
                                         float max_pair_fraction) {
  g.router = reinterpret_cast<router_fn>(router);
  g.up_row_cost = up_row_cost;
  g.min_dense_tokens = min_dense_tokens;
  g.max_pair_fraction = max_pair_fraction;
  return 0;
}

extern "C" int blockffn_ops_bind(void *linear, void *resolve, int threads, long max_rows, const long *rows,
                                 long widen_rows) {
  g.linear = reinterpret_cast<linear_fn>(linear);
  g.resolve = reinterpret_cast<resolve_fn>(resolve);
  g.threads = threads;
  g.max_rows = max_rows;
  for (int i = 0; i < N_ISA; i++)
    for (int j = 0; j < 3; j++) g.rows[i][j] = rows[3 * i + j];
  g.widen_rows = widen_rows;
  return 0;
}

extern "C" int blockffn_ops_bind_kmajor(void *kmajor, void *kmajor_f32, void *kmajor_i8, const long *widen_from) {
  g.kmajor = reinterpret_cast<kmajor_fn>(kmajor);
  g.kmajor_f32 = reinterpret_cast<kmajor_fn>(kmajor_f32);
  g.kmajor_i8 = reinterpret_cast<kmajor_i8_fn>(kmajor_i8);
  for (int i = 0; i < N_ISA; i++) g.kmajor_widen[i] = widen_from[i];
  return 0;
}

TORCH_LIBRARY(blockffn_native, m) {
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor row_sums) -> Tensor");
  m.def("linear_kmajor(Tensor x, Tensor packed) -> Tensor");
  m.def("int8_linear_kmajor(Tensor x, Tensor packed, Tensor weight_scale, Tensor row_sums) -> Tensor");
  m.def("router_experts(Tensor x, Tensor w_router, Tensor norm_w, float eps, Tensor w_up, Tensor w_down_t, "
        "Tensor segments, Tensor? stats, Tensor? up_scale, Tensor? down_scale, Tensor? up_row_sums, str backend, "
        "int layer_id, int expert_bytes, bool record) -> Tensor");
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor(a!) output, Tensor step, int layer) -> ()");
  m.def("attention_layers(Tensor step, Tensor[] kv_caches, str[] isas, float[] params) -> ()");
  m.def("attention_step(Tensor step, Tensor[] meta, int[] ints) -> ()");
  m.def("attention_release(Tensor step) -> ()");
}

TORCH_LIBRARY_IMPL(blockffn_native, CPU, m) {
  m.impl("linear", linear);
  m.impl("int8_linear", int8_linear);
  m.impl("linear_kmajor", linear_kmajor);
  m.impl("int8_linear_kmajor", int8_linear_kmajor);
  m.impl("router_experts", router_experts);
  m.impl("attention", attention);
  m.impl("attention_layers", attention_layers);
  m.impl("attention_step", attention_step);
  m.impl("attention_release", attention_release);
}
