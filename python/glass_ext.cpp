// glass_kernels._C: a thin pybind11 layer over the C ABI (csrc/include/glass/glass.h).
// Tensors arrive as raw pointers (Python ints from tensor.data_ptr()); the Python layer
// (glass_kernels/ops.py) has already validated dtypes, shapes and contiguity. The core re-checks
// sizes, indices and null pointers, and its errors become ValueError / IndexError. The GIL is
// released around every kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "glass/glass.h"

namespace py = pybind11;

namespace {

glass_dtype parse_dtype(const std::string& s) {
  if (s == "float32") return GLASS_F32;
  if (s == "float16") return GLASS_F16;
  if (s == "bfloat16") return GLASS_BF16;
  throw py::value_error("dtype: expected 'float32', 'float16' or 'bfloat16', got '" + s + "'");
}

glass_activation parse_act(const std::string& s) {
  if (s == "silu") return GLASS_ACT_SILU;
  if (s == "gelu_tanh") return GLASS_ACT_GELU_TANH;
  if (s == "gelu") return GLASS_ACT_GELU;
  if (s == "relu") return GLASS_ACT_RELU;
  throw py::value_error("activation: expected 'silu', 'gelu_tanh', 'gelu' or 'relu', got '" + s +
                        "'");
}

glass_qtype parse_qtype(const std::string& s) {
  if (s == "q8_0") return GLASS_Q8_0;
  if (s == "q4_0") return GLASS_Q4_0;
  throw py::value_error("wtype: expected 'q8_0' or 'q4_0', got '" + s + "'");
}

glass_isa parse_isa(const std::string& s) {
  for (int i = GLASS_ISA_AUTO; i <= GLASS_ISA_LAST_; ++i)
    if (s == glass_isa_name(static_cast<glass_isa>(i))) return static_cast<glass_isa>(i);
  throw py::value_error("isa: expected 'auto', 'scalar', 'avx2', 'avx512', 'avx512_ext', 'neon' or 'neon_ext', got '" + s +
                        "'");
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// The one mapping of a core status to a Python exception: an index out of range -> IndexError, an
// internal failure (allocation) -> RuntimeError, every other invalid argument -> ValueError.
void raise_for(glass_status st, const std::string& msg) {
  switch (st) {
    case GLASS_OK: return;
    case GLASS_ERR_INDEX: throw py::index_error(msg);
    case GLASS_ERR_INTERNAL: throw std::runtime_error(msg);
    default: throw py::value_error(msg);
  }
}

// A control call (no GIL release): the core's thread-local message is read on this thread.
void check(glass_status st) {
  if (st != GLASS_OK) raise_for(st, glass_last_error());
}

// A kernel call with the GIL released; the message is read on the thread that ran it, before the
// GIL is taken back (another thread's call cannot overwrite a thread-local message).
template <class F>
void run_released(F&& kernel) {
  glass_status st;
  std::string msg;
  {
    py::gil_scoped_release nogil;
    st = kernel();
    if (st != GLASS_OK) msg = glass_last_error();
  }
  raise_for(st, msg);
}

// XOR of n 64-bit words read by `threads` threads, each its own contiguous part: a pure read stream
// with no floating-point dependency chain (integer XOR reassociates, so the compiler vectorises it),
// the memory system's read bandwidth as a decode step sees it. For the benchmarks' "% of STREAM"
// column; torch.sum over fp32 reads slower than the gathered kernels on some machines.
uint64_t xor_read(const uint64_t* a, int64_t n, int threads) {
  std::vector<uint64_t> part(threads, 0);
  std::vector<std::thread> team;
  for (int t = 0; t < threads; ++t)
    team.emplace_back([&, t] {
      const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
      uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = lo;
      for (; i + 8 <= hi; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] ^= a[i + j];
      for (; i < hi; ++i) acc[0] ^= a[i];
      uint64_t r = 0;
      for (int j = 0; j < 8; ++j) r ^= acc[j];
      part[t] = r;
    });
  uint64_t r = 0;
  for (int t = 0; t < threads; ++t) {
    team[t].join();
    r ^= part[t];
  }
  return r;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "glass_kernels C++ core (torch-free): sparse FFN, neuron statistics, selection";

  m.def(
      "sparse_ffn",
      [](const std::string& dtype, const std::string& act, uintptr_t x, int64_t B, int64_t T,
         int64_t d, uintptr_t w_gate, uintptr_t w_up, uintptr_t w_down_t, int64_t D, uintptr_t idx,
         int64_t k, bool idx_batched, uintptr_t y, int64_t ldw) {
        const glass_dtype dt = parse_dtype(dtype);
        const glass_activation a = parse_act(act);
        run_released([&] {
          return glass_sparse_ffn_strided(dt, a, ptr<const void>(x), B, T, d,
                                          ptr<const void>(w_gate), ptr<const void>(w_up),
                                          ptr<const void>(w_down_t), ldw == 0 ? d : ldw, D,
                                          ptr<const int32_t>(idx), k, idx_batched ? 1 : 0,
                                          ptr<void>(y));
        });
      },
      py::arg("dtype"), py::arg("activation"), py::arg("x"), py::arg("B"), py::arg("T"),
      py::arg("d"), py::arg("w_gate"), py::arg("w_up"), py::arg("w_down_t"), py::arg("D"),
      py::arg("idx"), py::arg("k"), py::arg("idx_batched"), py::arg("y"), py::arg("ldw") = 0,
      "Gated sparse FFN into y [B,T,d]; idx int32 [k] or [B,k] (idx_batched); weight rows ldw "
      "elements apart (0: d, contiguous [D, d]).");

  m.def(
      "sparse_mlp",
      [](const std::string& dtype, const std::string& act, uintptr_t x, int64_t B, int64_t T,
         int64_t d, uintptr_t w_in, uintptr_t b_in, uintptr_t w_out_t, uintptr_t b_out, int64_t D,
         uintptr_t idx, int64_t k, bool idx_batched, uintptr_t y, int64_t ldw) {
        const glass_dtype dt = parse_dtype(dtype);
        const glass_activation a = parse_act(act);
        run_released([&] {
          return glass_sparse_mlp_strided(dt, a, ptr<const void>(x), B, T, d,
                                          ptr<const void>(w_in), ptr<const void>(b_in),
                                          ptr<const void>(w_out_t), ptr<const void>(b_out),
                                          ldw == 0 ? d : ldw, D, ptr<const int32_t>(idx), k,
                                          idx_batched ? 1 : 0, ptr<void>(y));
        });
      },
      py::arg("dtype"), py::arg("activation"), py::arg("x"), py::arg("B"), py::arg("T"),
      py::arg("d"), py::arg("w_in"), py::arg("b_in"), py::arg("w_out_t"), py::arg("b_out"),
      py::arg("D"), py::arg("idx"), py::arg("k"), py::arg("idx_batched"), py::arg("y"),
      py::arg("ldw") = 0,
      "Non-gated sparse MLP into y [B,T,d]; b_in / b_out may be 0 (no bias); weight rows ldw "
      "elements apart (0: d).");

  m.def(
      "sparse_ffn_q",
      [](const std::string& wtype, const std::string& dtype, const std::string& act, uintptr_t x,
         int64_t B, int64_t T, int64_t d, uintptr_t w_gate, uintptr_t w_up, uintptr_t w_down_t,
         int64_t ldw, int64_t D, uintptr_t idx, int64_t k, bool idx_batched, uintptr_t y) {
        const glass_qtype qt = parse_qtype(wtype);
        const glass_dtype dt = parse_dtype(dtype);
        const glass_activation a = parse_act(act);
        run_released([&] {
          return glass_sparse_ffn_q(qt, dt, a, ptr<const void>(x), B, T, d, ptr<const void>(w_gate),
                                    ptr<const void>(w_up), ptr<const void>(w_down_t), ldw, D,
                                    ptr<const int32_t>(idx), k, idx_batched ? 1 : 0, ptr<void>(y));
        });
      },
      py::arg("wtype"), py::arg("dtype"), py::arg("activation"), py::arg("x"), py::arg("B"),
      py::arg("T"), py::arg("d"), py::arg("w_gate"), py::arg("w_up"), py::arg("w_down_t"),
      py::arg("ldw"), py::arg("D"), py::arg("idx"), py::arg("k"), py::arg("idx_batched"), py::arg("y"),
      "Gated sparse FFN over quantized rows ('q8_0' | 'q4_0'; ldw: row stride in values).");

  m.def(
      "sparse_mlp_q",
      [](const std::string& wtype, const std::string& dtype, const std::string& act, uintptr_t x,
         int64_t B, int64_t T, int64_t d, uintptr_t w_in, uintptr_t b_in, uintptr_t w_out_t,
         uintptr_t b_out, int64_t ldw, int64_t D, uintptr_t idx, int64_t k, bool idx_batched,
         uintptr_t y) {
        const glass_qtype qt = parse_qtype(wtype);
        const glass_dtype dt = parse_dtype(dtype);
        const glass_activation a = parse_act(act);
        run_released([&] {
          return glass_sparse_mlp_q(qt, dt, a, ptr<const void>(x), B, T, d, ptr<const void>(w_in),
                                    ptr<const void>(b_in), ptr<const void>(w_out_t),
                                    ptr<const void>(b_out), ldw, D, ptr<const int32_t>(idx), k,
                                    idx_batched ? 1 : 0, ptr<void>(y));
        });
      },
      py::arg("wtype"), py::arg("dtype"), py::arg("activation"), py::arg("x"), py::arg("B"),
      py::arg("T"), py::arg("d"), py::arg("w_in"), py::arg("b_in"), py::arg("w_out_t"),
      py::arg("b_out"), py::arg("ldw"), py::arg("D"), py::arg("idx"), py::arg("k"),
      py::arg("idx_batched"), py::arg("y"),
      "Non-gated sparse MLP over quantized rows; b_in / b_out may be 0.");

  m.def(
      "qkernel_name",
      [](const std::string& wtype) { return std::string(glass_qkernel_name(parse_qtype(wtype))); },
      py::arg("wtype"), "Name of the quantized kernel the current ISA runs, e.g. 'q8_0_sparse_ffn__avx2'.");

  m.def(
      "neuron_stats",
      [](const std::string& dtype, uintptr_t h, int64_t B, int64_t T, int64_t D,
         uintptr_t down_norms, uintptr_t mask, uintptr_t out) {
        const glass_dtype dt = parse_dtype(dtype);
        run_released([&] {
          return glass_neuron_stats(dt, ptr<const void>(h), B, T, D, ptr<const float>(down_norms),
                                    ptr<const uint8_t>(mask), ptr<float>(out));
        });
      },
      py::arg("dtype"), py::arg("h"), py::arg("B"), py::arg("T"), py::arg("D"),
      py::arg("down_norms"), py::arg("mask"), py::arg("out"),
      "Adds the per-neuron statistic of h [B,T,D] into out fp32 [B,D].");

  m.def(
      "select_neurons",
      [](uintptr_t local, int64_t B, int64_t D, uintptr_t global_rank, double lam, int64_t k,
         uintptr_t out) {
        run_released([&] {
          return glass_select_neurons(ptr<const float>(local), B, D, ptr<const int32_t>(global_rank),
                                      lam, k, ptr<int32_t>(out));
        });
      },
      py::arg("local"), py::arg("B"), py::arg("D"), py::arg("global_rank"), py::arg("lam"),
      py::arg("k"), py::arg("out"),
      "Rank aggregation + top-k into out int32 [B,k] (rows sorted ascending).");

  m.def(
      "set_isa", [](const std::string& name) { check(glass_set_isa(parse_isa(name))); },
      py::arg("name"), "Force a code path: 'auto' | 'scalar' | 'avx2' | 'avx512' | 'avx512_ext' | 'neon' | 'neon_ext'.");
  m.def("get_isa", []() { return std::string(glass_isa_name(glass_get_isa())); });
  m.def("supported_isas", []() {
    std::vector<std::string> out;
    for (int i = GLASS_ISA_SCALAR; i <= GLASS_ISA_LAST_; ++i)
      if (glass_isa_supported(static_cast<glass_isa>(i)))
        out.emplace_back(glass_isa_name(static_cast<glass_isa>(i)));
    return out;
  });
  m.def(
      "kernel_name",
      [](const std::string& dtype, bool gated) {
        return std::string(glass_kernel_name(parse_dtype(dtype), gated ? 1 : 0));
      },
      py::arg("dtype"), py::arg("gated") = true,
      "Name of the kernel the current ISA runs, e.g. 'bf16_sparse_ffn__avx2'.");
  m.def(
      "set_num_threads", [](int n) { glass_set_num_threads(n); }, py::arg("n"),
      "Threads used by the kernels (n <= 0: all cores).");
  m.def("get_num_threads", []() { return glass_get_num_threads(); });
  m.def(
      "set_threading",
      [](const std::string& how) {
        if (how != "pool" && how != "openmp") throw py::value_error("threading must be 'pool' or 'openmp', got '" + how + "'");
        check(glass_set_threading(how == "openmp" ? GLASS_THREADING_OPENMP : GLASS_THREADING_POOL));
      },
      py::arg("how"),
      "Where the kernels' threads come from: 'pool' (the core's own) or 'openmp' (the process's OpenMP team).");
  m.def("get_threading", []() { return std::string(glass_get_threading() == GLASS_THREADING_OPENMP ? "openmp" : "pool"); });
  m.def(
      "set_decode_tuning",
      [](int neurons_in_flight, int prefetch_neurons) {
        check(glass_set_decode_tuning(neurons_in_flight, prefetch_neurons));
      },
      py::arg("neurons_in_flight"), py::arg("prefetch_neurons"),
      "T = 1 decoding: selected neurons in flight per thread (1..8) and prefetch distance in neurons (0..64).");
  m.def(
      "read_bandwidth_probe",
      [](uintptr_t p, int64_t nbytes, int threads) {
        if (nbytes < 8 || threads < 1 || (p % 8) != 0)
          throw py::value_error("read_bandwidth_probe: need >= 8 bytes, 8-byte aligned, threads >= 1");
        py::gil_scoped_release nogil;
        return xor_read(reinterpret_cast<const uint64_t*>(p), nbytes / 8, threads);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("threads"),
      "Benchmark helper (not part of the C ABI): read nbytes with `threads` threads (XOR of 64-bit "
      "words, returned so the reads cannot be elided).");

  m.def("get_decode_tuning", []() {
    int g = 0, p = 0;
    glass_get_decode_tuning(&g, &p);
    return py::make_tuple(g, p);
  });
}
