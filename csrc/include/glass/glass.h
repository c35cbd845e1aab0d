/*
 * glass_kernels C ABI: sparse-FFN decoding kernels for GLASS (arXiv 2508.14302).
 *
 * This is the only header a vendoring inference stack needs. The core is torch-free C++17
 * (OpenMP only); every function validates its arguments and returns a glass_status. On error
 * glass_last_error() returns a thread-local message naming the argument.
 *
 * Layout (neuron-major): neuron i owns row i of every weight matrix, [D, d] each:
 * gated: W_gate, W_up, W_down_t (= W_down^T); non-gated: W_in (+ b_in[i]), W_out_t (= W_out^T).
 * The *_strided functions take the rows' stride ldw (in elements, >= d, the same for every weight
 * matrix of the call): row i of W starts at W + i * ldw. Two layouts are common:
 *   separate: each matrix contiguous [D, d], ldw = d (what glass_sparse_ffn / _mlp assume);
 *   neuron-bundled: one [D, 3, d] block (gated) or [D, 2, d] (non-gated) holding neuron i's
 *     gate, up and down rows next to each other: w_gate = P, w_up = P + d, w_down_t = P + 2d,
 *     ldw = 3d (w_in = P, w_out_t = P + d, ldw = 2d). One neuron is then one contiguous read of
 *     3 d (2 d) elements, which some memory systems serve faster than three rows far apart.
 * Activations x / y / h and biases have the weights' dtype; accumulation is fp32.
 */
#ifndef GLASS_GLASS_H
#define GLASS_GLASS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define GLASS_API __declspec(dllexport)
#else
#define GLASS_API __attribute__((visibility("default")))
#endif

/* Each argument enum ends in a *_INT_RANGE_ member that is never a valid value: it widens the type's
 * range to every int, so that a C caller may pass any int (C++ gives no meaning to an enum value
 * outside its range). The core checks every enum argument against its valid values and returns
 * GLASS_ERR_ARG otherwise. */
typedef enum { GLASS_F32 = 0, GLASS_F16 = 1, GLASS_BF16 = 2, GLASS_DTYPE_INT_RANGE_ = 0x7fffffff } glass_dtype;

typedef enum {
  GLASS_ACT_SILU = 0,      /* x * sigmoid(x) */
  GLASS_ACT_GELU_TANH = 1, /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
  GLASS_ACT_GELU = 2,      /* exact: 0.5 x (1 + erf(x / sqrt(2))) */
  GLASS_ACT_RELU = 3,
  GLASS_ACT_INT_RANGE_ = 0x7fffffff /* not a value, see above */
} glass_activation;

typedef enum {
  GLASS_ISA_AUTO = 0, /* the best path the CPU supports (also what GLASS_ISA=auto selects) */
  GLASS_ISA_SCALAR = 1,
  GLASS_ISA_AVX2 = 2,   /* AVX2 + FMA + F16C */
  GLASS_ISA_AVX512 = 3, /* AVX-512 F/BW/VL/DQ (bf16 / fp16 widened to fp32) */
  GLASS_ISA_NEON = 4,   /* AArch64 Advanced SIMD baseline: fp16/bf16 widened to fp32 */
  GLASS_ISA_NEON_EXT = 5, /* NEON + the widening multiply-adds the CPU has, per dtype: FMLAL
                            (FEAT_FHM) for fp16, BFMLALB/T (FEAT_BF16) for bf16; NEON otherwise */
  GLASS_ISA_AVX512_EXT = 6, /* AVX-512 + the extensions the CPU has, per dtype: VDPBF16PS (AVX512-BF16)
                              for the decode dot products of bf16 rows and bf16 x; AVX-512 otherwise */
  GLASS_ISA_LAST_ = GLASS_ISA_AVX512_EXT, /* not a path: the highest value, for loops over the paths */
  GLASS_ISA_INT_RANGE_ = 0x7fffffff /* not a value, see above */
} glass_isa;

typedef enum {
  GLASS_OK = 0,
  GLASS_ERR_NULL = 1,        /* a required pointer is NULL */
  GLASS_ERR_SIZE = 2,        /* a size is <= 0 (or k outside [1, D]) or the product overflows */
  GLASS_ERR_INDEX = 3,       /* an index (idx, global_rank) is out of range */
  GLASS_ERR_ARG = 4,         /* an enum or scalar argument is invalid (dtype, activation, lambda) */
  GLASS_ERR_UNSUPPORTED = 5, /* the ISA is not compiled in or not supported by this CPU */
  GLASS_ERR_INTERNAL = 6     /* allocation failure or another internal error */
} glass_status;

/* Thread-local message of the last error in this thread ("" if none). */
GLASS_API const char* glass_last_error(void);

/*
 * Gated sparse FFN: y[b,t] = sum_{i in idx_b} act(W_gate[i].x[b,t]) * (W_up[i].x[b,t]) * W_down_t[i]
 * x [B,T,d], y [B,T,d] (y may not alias x); idx int32 [k] shared by all sequences
 * (idx_batched = 0) or [B,k] (idx_batched != 0). Every index must be in [0, D); duplicates
 * count once per occurrence. y is overwritten (cast from fp32, round to nearest even).
 */
GLASS_API glass_status glass_sparse_ffn(glass_dtype dtype, glass_activation act, const void* x,
                                        int64_t B, int64_t T, int64_t d, const void* w_gate,
                                        const void* w_up, const void* w_down_t, int64_t D,
                                        const int32_t* idx, int64_t k, int idx_batched, void* y);

/* glass_sparse_ffn over weight rows ldw elements apart (ldw >= d, else GLASS_ERR_SIZE). */
GLASS_API glass_status glass_sparse_ffn_strided(glass_dtype dtype, glass_activation act,
                                                const void* x, int64_t B, int64_t T, int64_t d,
                                                const void* w_gate, const void* w_up,
                                                const void* w_down_t, int64_t ldw, int64_t D,
                                                const int32_t* idx, int64_t k, int idx_batched,
                                                void* y);

/*
 * Non-gated sparse MLP: y[b,t] = sum_{i in idx_b} act(W_in[i].x[b,t] + b_in[i]) * W_out_t[i] + b_out
 * b_in [D] and b_out [d] (model dtype) may be NULL (treated as zero).
 */
GLASS_API glass_status glass_sparse_mlp(glass_dtype dtype, glass_activation act, const void* x,
                                        int64_t B, int64_t T, int64_t d, const void* w_in,
                                        const void* b_in, const void* w_out_t, const void* b_out,
                                        int64_t D, const int32_t* idx, int64_t k, int idx_batched,
                                        void* y);

/* glass_sparse_mlp over weight rows ldw elements apart (ldw >= d, else GLASS_ERR_SIZE). */
GLASS_API glass_status glass_sparse_mlp_strided(glass_dtype dtype, glass_activation act,
                                                const void* x, int64_t B, int64_t T, int64_t d,
                                                const void* w_in, const void* b_in,
                                                const void* w_out_t, const void* b_out,
                                                int64_t ldw, int64_t D, const int32_t* idx,
                                                int64_t k, int idx_batched, void* y);

/*
 * Quantized weight rows (weight-only quantization; activations x / y / biases stay in `dtype`):
 * ggml's Q8_0 / Q4_0 block layout, byte for byte, so a stack that holds such rows can hand them over.
 * A row of d values (d % 32 == 0) is d / 32 blocks of 32 values, each block
 *   Q8_0 (34 bytes): uint16 s (an IEEE fp16 scale), int8 q[32];                 value j = s * q[j]
 *   Q4_0 (18 bytes): uint16 s (fp16 scale), uint8 q[16]; value j < 16 = s * ((q[j] & 15) - 8),
 *                    value 16 + j = s * ((q[j] >> 4) - 8)
 * (little-endian). Row i of each weight starts ldw / 32 blocks after row i - 1: ldw = d for
 * separate [D, d] matrices, 3d for the neuron-bundled layout (w_up = w_gate + d / 32 blocks, ...);
 * ldw must be a multiple of 32 and >= d, else GLASS_ERR_SIZE. The products are accumulated in fp32
 * (each block's dot product unscaled, then times its scale). On AVX2 / AVX-512 the dot products
 * with x (gate / up, in) multiply the codes by x rounded to 16-bit fixed point per block of 32
 * values (a step of the block's max |x| / 32767, so each x value is off by at most 2^-16 of that
 * max, 2^8 times less than Q8_0's own rounding of the weights), summed exactly in int32; a block of
 * x holding inf or NaN makes those products NaN. Everything else as glass_sparse_ffn /
 * glass_sparse_mlp.
 */
typedef enum { GLASS_Q8_0 = 0, GLASS_Q4_0 = 1, GLASS_QTYPE_INT_RANGE_ = 0x7fffffff } glass_qtype;

GLASS_API glass_status glass_sparse_ffn_q(glass_qtype wtype, glass_dtype dtype, glass_activation act,
                                          const void* x, int64_t B, int64_t T, int64_t d,
                                          const void* w_gate, const void* w_up, const void* w_down_t,
                                          int64_t ldw, int64_t D, const int32_t* idx, int64_t k,
                                          int idx_batched, void* y);
GLASS_API glass_status glass_sparse_mlp_q(glass_qtype wtype, glass_dtype dtype, glass_activation act,
                                          const void* x, int64_t B, int64_t T, int64_t d,
                                          const void* w_in, const void* b_in, const void* w_out_t,
                                          const void* b_out, int64_t ldw, int64_t D,
                                          const int32_t* idx, int64_t k, int idx_batched, void* y);
/* Name of the quantized kernel the current ISA runs, e.g. "q8_0_sparse_ffn__avx2". */
GLASS_API const char* glass_qkernel_name(glass_qtype wtype);

/*
 * Neuron statistics (GRIFFIN's, docs/method.md), ADDED into out fp32 [B, D]:
 * for each token t of sequence b with mask[b,t] != 0 (or mask == NULL): v = h[b,t,:]
 * (times down_norms elementwise when down_norms != NULL: the impact form), n = ||v||_2 in fp32;
 * if n > 0: out[b,i] += (v_i / n)^2. h [B,T,D] has the model dtype; down_norms fp32 [D];
 * mask uint8 [B,T].
 */
GLASS_API glass_status glass_neuron_stats(glass_dtype dtype, const void* h, int64_t B, int64_t T,
                                          int64_t D, const float* down_norms, const uint8_t* mask,
                                          float* out);

/*
 * Rank aggregation + top-k. local fp32 [B, D] (finite; NaN/Inf is GLASS_ERR_ARG), global_rank
 * int32 [D] with values in [1, D] (1 = most important), lam in [0, 1], k in [1, D].
 * r^L = rank of local[b] by descending score, ties -> lower index (1..D);
 * a(i) = lam * r^G(i) + (1 - lam) * r^L(i) in double, evaluated in that order without FMA;
 * the k smallest a(i) are kept, ties -> smaller r^L, then lower index.
 * out int32 [B, k]: each row sorted ascending.
 */
GLASS_API glass_status glass_select_neurons(const float* local, int64_t B, int64_t D,
                                            const int32_t* global_rank, double lam, int64_t k,
                                            int32_t* out);

/* ISA control. glass_set_isa(GLASS_ISA_AUTO) restores the best supported path. */
GLASS_API glass_status glass_set_isa(glass_isa isa);
GLASS_API glass_isa glass_get_isa(void);
/* 1 if the path is compiled in AND supported by this CPU (and OS), else 0. */
GLASS_API int glass_isa_supported(glass_isa isa);
/* "auto" | "scalar" | "avx2" | "avx512" | "neon" (or "unknown"). */
GLASS_API const char* glass_isa_name(glass_isa isa);
/* Name of the kernel the current ISA runs for (dtype, op), e.g. "bf16_sparse_ffn__avx2". */
GLASS_API const char* glass_kernel_name(glass_dtype dtype, int gated);

/* Threads used by the kernels (n <= 0: the default: GLASS_NUM_THREADS, else OMP_NUM_THREADS, else
 * the CPUs this process may run on). */
GLASS_API void glass_set_num_threads(int n);
GLASS_API int glass_get_num_threads(void);

/* Where those threads come from. GLASS_THREADING_POOL (the default): the core's own small pool, in
 * which the caller works too and never waits for a helper that the OS has not scheduled (robust on
 * a loaded machine). GLASS_THREADING_OPENMP: an OpenMP parallel region, i.e. the OpenMP team of the
 * process. Inside a host that runs its own work on OpenMP threads (PyTorch's CPU build, with the
 * same libgomp), that team is the host's: its threads are already awake between the host's ops,
 * where a second pool would fight them for the cores (measured on a 2-core Xeon: a SmolLM2 FFN
 * call inside the model took 480 us with the pool, 220 us on the host's team). The environment
 * variable GLASS_THREADING=pool|openmp sets the default. GLASS_ERR_UNSUPPORTED if the core was
 * built without OpenMP (the setting then stays as it was); GLASS_ERR_ARG for another value. */
typedef enum {
  GLASS_THREADING_POOL = 0,
  GLASS_THREADING_OPENMP = 1,
  GLASS_THREADING_INT_RANGE_ = 0x7fffffff
} glass_threading;
GLASS_API glass_status glass_set_threading(glass_threading threading);
GLASS_API glass_threading glass_get_threading(void);

/* Decode tuning of sparse_ffn / sparse_mlp when each index set has one token (B sequences of T = 1,
 * or B tokens sharing one set): how many selected neurons each thread keeps in flight (their gate/up
 * rows read together, then their down rows in one pass), 1..8 (1: one neuron at a time, with the
 * token-tile path's own prefetch), and how many neurons ahead rows are prefetched into L2 while a
 * group streams (line by line, interleaved with its loads), 0..64 (0: none). Both are per machine: glass_kernels measures them per CPU model; the defaults
 * are GLASS_NEURONS_IN_FLIGHT and GLASS_PREFETCH_NEURONS from the environment, else 4 and 0.
 * Results are bitwise the same for any thread count at a given setting; different settings differ
 * in the last bits (the order of fp32 additions in the dot products).
 * GLASS_ERR_ARG if a value is outside its range (the setting then stays as it was). */
GLASS_API glass_status glass_set_decode_tuning(int neurons_in_flight, int prefetch_neurons);
GLASS_API void glass_get_decode_tuning(int* neurons_in_flight, int* prefetch_neurons);

#ifdef __cplusplus
}
#endif

#endif /* GLASS_GLASS_H */
