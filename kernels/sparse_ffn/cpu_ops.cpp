// torch ops over the native CPU kernel (cpu_native.c), for the calls a decode step makes dozens of
// times: `blockffn_native::linear` and `::int8_linear` (the streaming GEMV of the attention projections and
// the lm_head).
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
// cpu_linear.native_rows and quantization.int8_linear, the Python implementations of this op on
// machines where this file cannot be built.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

using linear_fn = int (*)(const void *x, long ldx, int xdt, const void *w, int wdt, long M, long N, long K,
                          void *y, long ldy, int nthreads, int isa, const float *scale, const int32_t *rowsum);
using resolve_fn = int (*)(int isa);

constexpr int ISA_AVX512_BF16 = 3, ISA_AMX = 4;  // cpu_native.c's codes

struct Bound {
  linear_fn linear = nullptr;
  resolve_fn resolve = nullptr;
  int threads = 0;
  int64_t max_rows = 0;      // THRESHOLDS.cpu_linear_max_tokens
  int64_t max_rows_amx = 0;  // THRESHOLDS.cpu_linear_max_tokens_amx (bf16, AMX CPUs)
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
    if (!(float_x && (M <= g.max_rows || isa_now() >= ISA_AVX512_BF16))) {
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
    const bool native = float_x && xdt == wdt &&
                        (M <= g.max_rows || (xdt == 1 && M <= g.max_rows_amx && isa_now() >= ISA_AMX));
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

at::Tensor int8_linear(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &weight_scale,
                       const at::Tensor &row_sums) {
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kChar, "int8_linear: weight ", weight.scalar_type(),
                    "; expected torch.int8");
  return run(x, weight, weight_scale, row_sums);
}

}  // namespace

extern "C" int blockffn_ops_bind(void *linear, void *resolve, int threads, long max_rows, long max_rows_amx) {
  g.linear = reinterpret_cast<linear_fn>(linear);
  g.resolve = reinterpret_cast<resolve_fn>(resolve);
  g.threads = threads;
  g.max_rows = max_rows;
  g.max_rows_amx = max_rows_amx;
  return 0;
}

TORCH_LIBRARY(blockffn_native, m) {
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor row_sums) -> Tensor");
}

TORCH_LIBRARY_IMPL(blockffn_native, CPU, m) {
  m.impl("linear", linear);
  m.impl("int8_linear", int8_linear);
}
