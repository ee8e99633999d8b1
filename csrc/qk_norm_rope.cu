// Per-head RMSNorm (learnable scale) + RoPE on interleaved pairs, forward, for Q and K.
//
// Angles come as the compact [2, S, D/2] fp32 table (cos plane, sin plane; one angle per pair) that the Python
// launcher builds on the device (tpfuse.kernels._rope.angle_table).
//
// Vector kernel (16-byte aligned rows, D = TPR * VPL * VEC): a group of TPR lanes owns one (b, s, h) row, a lane VPL
// vectors of VEC consecutive features (VEC/2 RoPE pairs each, so the partner is in the lane's own registers);
// two vectors per lane (D = 128 bf16: 8 lanes) spend one shuffle level less per row than one (16 lanes). One lane
// does the Q row and the K row of the same (b, s, h), so the angles are read once for both, and ROWS rows of each in
// turn, so its RMSNorm scales are read once for all of them. 32-bit index math; (b, s, h) from the row index with
// two multiply-high divisions (FastDiv) for a lane's first row, then a carry step per row. Sums are TPR-lane xor
// shuffles.
//
// Pair kernel (the fallback: any even D up to 16 * TPR, rows that start at an even element but not 16-byte
// aligned): the same layout with one RoPE pair per access, a 32-bit word (bf16/fp16) or an 8-byte float2 (fp32),
// 8 pairs per lane, masked by a per-lane bit set. No 16-bit access, no division (1/D from the host). Rows starting
// at an odd element never reach a kernel: the launcher copies them (tpfuse.kernels.cuda_backend).
#include "common.cuh"

namespace tpfuse {

struct RowStrides {
  int b, s, h;  // element strides of [B, S, H, D]; the last dim is contiguous; extents < 2^31 (checked)
};

struct RowIndex {
  int b, s, h;
};

__device__ __forceinline__ RowIndex split_row(uint32_t r, const FastDiv& H, const FastDiv& S) {
  const uint32_t bs = H.div(r), b = S.div(bs);
  return {int(b), int(bs - b * S.d), int(r - bs * H.d)};
}

__device__ __forceinline__ int offset(const RowStrides& st, const RowIndex& i) {
  return i.b * st.b + i.s * st.s + i.h * st.h;
}

template <typename T, int VEC, int TPR, int VPL, int ROWS, bool ROPE>
__global__ void qk_norm_rope_vec_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ qw,
                                        const T* __restrict__ kw, const float* __restrict__ ang, T* __restrict__ qo,
                                        T* __restrict__ ko, int n_rows, FastDiv H, FastDiv S, RowStrides sq,
                                        RowStrides sk, RowStrides sqo, RowStrides sko, float eps) {
  // A lane holds VPL vectors of a row, at (v * TPR + lane) * VEC: each vector index is contiguous across lanes.
  constexpr int D = TPR * VPL * VEC, HALF = VEC / 2;
  const int lane = threadIdx.x % TPR;
  const int group = (blockIdx.x * blockDim.x + threadIdx.x) / TPR;
  float wq[VPL][VEC], wk[VPL][VEC];
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    load_vec<T, VEC>(qw + (v * TPR + lane) * VEC, wq[v]);
    load_vec<T, VEC>(kw + (v * TPR + lane) * VEC, wk[v]);
  }
  const int ang_plane = int(S.d) * (D / 2);
  // A group takes ROWS consecutive rows (a row is 2 x 128-byte lines: coalesced on its own): one division pair
  // for the first, then (b, s, h) step like an odometer.
  const int r0 = group * ROWS;
  RowIndex at = split_row(r0 < n_rows ? r0 : 0, H, S);
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    if (i > 0 && ++at.h == int(H.d)) {
      at.h = 0;
      if (++at.s == int(S.d)) at.s = 0, ++at.b;
    }
    const bool active = r0 + i < n_rows;  // rows past the end stay for the shuffles, with no memory traffic
    float x[VPL][VEC], y[VPL][VEC], c[VPL][HALF], sn[VPL][HALF];
    float ssx = 0.f, ssy = 0.f;
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      const int d = (v * TPR + lane) * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) x[v][j] = y[v][j] = 0.f;
      if (active) {
        load_vec<T, VEC>(q + offset(sq, at) + d, x[v]);
        load_vec<T, VEC>(k + offset(sk, at) + d, y[v]);
      }
      if (ROPE && active) {
        const float* a = ang + at.s * (D / 2) + d / 2;
        load_vec<float, HALF>(a, c[v]);
        load_vec<float, HALF>(a + ang_plane, sn[v]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        ssx += x[v][j] * x[v][j];
        ssy += y[v][j] * y[v][j];
      }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off /= 2) {
      ssx += __shfl_xor_sync(0xffffffffu, ssx, off, TPR);
      ssy += __shfl_xor_sync(0xffffffffu, ssy, off, TPR);
    }
    const float rx = rsqrtf(ssx * (1.f / D) + eps), ry = rsqrtf(ssy * (1.f / D) + eps);
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
#pragma unroll
      for (int p = 0; p < HALF; ++p) {
        const float xe = x[v][2 * p] * rx * wq[v][2 * p], xo = x[v][2 * p + 1] * rx * wq[v][2 * p + 1];
        const float ye = y[v][2 * p] * ry * wk[v][2 * p], yo = y[v][2 * p + 1] * ry * wk[v][2 * p + 1];
        if (ROPE) {
          x[v][2 * p] = xe * c[v][p] - xo * sn[v][p];
          x[v][2 * p + 1] = xo * c[v][p] + xe * sn[v][p];
          y[v][2 * p] = ye * c[v][p] - yo * sn[v][p];
          y[v][2 * p + 1] = yo * c[v][p] + ye * sn[v][p];
        } else {
          x[v][2 * p] = xe, x[v][2 * p + 1] = xo, y[v][2 * p] = ye, y[v][2 * p + 1] = yo;
        }
      }
      if (active) {
        const int d = (v * TPR + lane) * VEC;
        store_vec_global<T, VEC>(qo + offset(sqo, at) + d, x[v]);
        store_vec_global<T, VEC>(ko + offset(sko, at) + d, y[v]);
      }
    }
  }
}

// One RoPE pair (elements 2p, 2p + 1) as one aligned access: a 32-bit word of two 16-bit elements, or a float2.
template <typename T> struct Pair {
  using U = uint32_t;
  static __device__ __forceinline__ float2 unpack(U u) { return word_to_float2<T>(u); }
  static __device__ __forceinline__ U pack(float a, float b) { return float2_to_word<T>(a, b); }
};
template <> struct Pair<float> {
  using U = float2;
  static __device__ __forceinline__ float2 unpack(U u) { return u; }
  static __device__ __forceinline__ U pack(float a, float b) { return make_float2(a, b); }
};

constexpr int kQkPairsPerLane = 8;  // 16 features per lane: the vector kernel's 2 x 8 at D = 128, 8 lanes

template <typename T, int TPR, int ROWS, bool ROPE>
__global__ void __launch_bounds__(256) qk_norm_rope_pair_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ qw, const T* __restrict__ kw,
    const float* __restrict__ ang, T* __restrict__ qo, T* __restrict__ ko, int n_rows, FastDiv H, FastDiv S, int D,
    RowStrides sq, RowStrides sk, RowStrides sqo, RowStrides sko, float inv_d, float eps) {
  using P = Pair<T>;
  using U = typename P::U;
  constexpr int PPL = kQkPairsPerLane;
  const int lane = threadIdx.x % TPR;  // TPR: a power of two, so these are shifts and masks
  const int group = (blockIdx.x * blockDim.x + threadIdx.x) / TPR;
  const int half = D >> 1;  // pairs per row; the lane's pair v is v * TPR + lane
  const int n_pairs = min(PPL, max(0, (half - lane + TPR - 1) / TPR));
  const uint32_t lane_valid = (1u << n_pairs) - 1;  // bit v: pair v is in the row
  float2 wq[PPL], wk[PPL];
  {
    const U* qwl = reinterpret_cast<const U*>(qw) + lane;
    const U* kwl = reinterpret_cast<const U*>(kw) + lane;
#pragma unroll
    for (int v = 0; v < PPL; ++v) {
      wq[v] = (lane_valid >> v) & 1 ? P::unpack(__ldg(qwl + v * TPR)) : make_float2(0.f, 0.f);
      wk[v] = (lane_valid >> v) & 1 ? P::unpack(__ldg(kwl + v * TPR)) : make_float2(0.f, 0.f);
    }
  }
  const int ang_plane = int(S.d) * half;
  const int r0 = group * ROWS;
  RowIndex at = split_row(r0 < n_rows ? r0 : 0, H, S);
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    if (i > 0 && ++at.h == int(H.d)) {
      at.h = 0;
      if (++at.s == int(S.d)) at.s = 0, ++at.b;
    }
    const uint32_t valid = r0 + i < n_rows ? lane_valid : 0u;  // rows past the end: shuffles only
    // Lane-base pointers, opaque so each pair's offset stays an immediate (see common.cuh).
    const U* xr = opaque(reinterpret_cast<const U*>(q + offset(sq, at)) + lane);
    const U* yr = opaque(reinterpret_cast<const U*>(k + offset(sk, at)) + lane);
    const float* cr = opaque(ang + (at.s * half + lane));  // cos plane
    const float* sr = opaque(cr + ang_plane);               // sin plane: its own base, so offsets stay immediates
    float2 x[PPL], y[PPL];
    float c[PPL], sn[PPL];
    float ssx = 0.f, ssy = 0.f;
#pragma unroll
    for (int v = 0; v < PPL; ++v) {
      const bool ok = (valid >> v) & 1;
      x[v] = ok ? P::unpack(__ldg(xr + v * TPR)) : make_float2(0.f, 0.f);
      y[v] = ok ? P::unpack(__ldg(yr + v * TPR)) : make_float2(0.f, 0.f);
      if (ROPE && ok) {  // unset for padding pairs, whose results are never stored
        c[v] = __ldg(cr + v * TPR);
        sn[v] = __ldg(sr + v * TPR);
      }
      ssx += x[v].x * x[v].x;  // one FFMA each: (a*a + b*b) + ss would be FMUL, FFMA, FADD
      ssx += x[v].y * x[v].y;
      ssy += y[v].x * y[v].x;
      ssy += y[v].y * y[v].y;
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off /= 2) {
      ssx += __shfl_xor_sync(0xffffffffu, ssx, off, TPR);
      ssy += __shfl_xor_sync(0xffffffffu, ssy, off, TPR);
    }
    const float rx = rsqrtf(ssx * inv_d + eps), ry = rsqrtf(ssy * inv_d + eps);
    U* xo = opaque(reinterpret_cast<U*>(qo + offset(sqo, at)) + lane);
    U* yo = opaque(reinterpret_cast<U*>(ko + offset(sko, at)) + lane);
#pragma unroll
    for (int v = 0; v < PPL; ++v) {
      const bool ok = (valid >> v) & 1;
      const float xe = x[v].x * rx * wq[v].x, xd = x[v].y * rx * wq[v].y;
      const float ye = y[v].x * ry * wk[v].x, yd = y[v].y * ry * wk[v].y;
      if (ROPE) {
        const float cs = c[v], sv = sn[v];
        store_global_if(ok, xo + v * TPR, P::pack(xe * cs - xd * sv, xd * cs + xe * sv));
        store_global_if(ok, yo + v * TPR, P::pack(ye * cs - yd * sv, yd * cs + ye * sv));
      } else {
        store_global_if(ok, xo + v * TPR, P::pack(xe, xd));
        store_global_if(ok, yo + v * TPR, P::pack(ye, yd));
      }
    }
  }
}

// The instantiated shapes, mirrored by tpfuse.kernels.cuda_backend (tested). Vector kernel: (TPR, VPL), two
// vectors per lane (one spends a shuffle level more per 16 bytes: 0.11-0.12 warp instructions per byte against
// 0.09, so D = 64 bf16 takes 4 lanes x 2, not 8 x 1). Pair kernel: TPR lanes x 8 pairs, D <= 16 TPR.
#define TPFUSE_QK_VEC_SHAPES(X) X(8, 2) X(16, 2) X(4, 2)
#define TPFUSE_QK_PAIR_LANES(X) X(4) X(8) X(16) X(32)

template <typename T, int VEC>
static cudaError_t launch(int tpr, int vpl, int vector, const void* q, const void* k, const void* qw, const void* kw,
                          const float* ang, void* qo, void* ko, int n_rows, FastDiv H, FastDiv S, int D,
                          RowStrides sq, RowStrides sk, RowStrides sqo, RowStrides sko, float eps, int has_rope,
                          int block, int grid, cudaStream_t stream) {
#define TPFUSE_QKR_ARGS (const T*)q, (const T*)k, (const T*)qw, (const T*)kw, ang, (T*)qo, (T*)ko, n_rows, H, S
#define TPFUSE_QKR_VEC(TPR, VPL)                                                                         \
  if (vector && tpr == TPR && vpl == VPL) {                                                              \
    if (D != TPR * VPL * VEC) return cudaErrorInvalidValue;                                              \
    if (has_rope)                                                                                        \
      qk_norm_rope_vec_kernel<T, VEC, TPR, VPL, 4, true><<<grid, block, 0, stream>>>(TPFUSE_QKR_ARGS, sq, sk, \
                                                                                      sqo, sko, eps);    \
    else                                                                                                 \
      qk_norm_rope_vec_kernel<T, VEC, TPR, VPL, 4, false><<<grid, block, 0, stream>>>(TPFUSE_QKR_ARGS, sq, sk,\
                                                                                       sqo, sko, eps);   \
    return cudaGetLastError();                                                                           \
  }
#define TPFUSE_QKR_PAIR(TPR)                                                                             \
  if (!vector && tpr == TPR) {                                                                           \
    if (D > 2 * kQkPairsPerLane * TPR) return cudaErrorInvalidValue;                                     \
    const float inv_d = 1.0f / float(D); /* on the host: no division in the kernel */                   \
    if (has_rope)                                                                                        \
      qk_norm_rope_pair_kernel<T, TPR, 4, true><<<grid, block, 0, stream>>>(TPFUSE_QKR_ARGS, D, sq, sk, sqo, \
                                                                             sko, inv_d, eps);           \
    else                                                                                                 \
      qk_norm_rope_pair_kernel<T, TPR, 4, false><<<grid, block, 0, stream>>>(TPFUSE_QKR_ARGS, D, sq, sk, sqo,\
                                                                              sko, inv_d, eps);          \
    return cudaGetLastError();                                                                           \
  }
  TPFUSE_QK_VEC_SHAPES(TPFUSE_QKR_VEC)
  TPFUSE_QK_PAIR_LANES(TPFUSE_QKR_PAIR)
  return cudaErrorInvalidValue;
#undef TPFUSE_QKR_PAIR
#undef TPFUSE_QKR_VEC
#undef TPFUSE_QKR_ARGS
}

}  // namespace tpfuse

// Launch configuration (vector or pair kernel, lanes per row, block, grid, fast divisors) is chosen by the Python
// launcher (tested on the CPU); this only dispatches. Returns a cudaError_t code (0: success).
// strides: q (b, s, h), k (b, s, h), qo (b, s, h), ko (b, s, h); divisors: H then S as (d, mul, shr).
extern "C" int tpfuse_qk_norm_rope_fwd(int dtype, int vector, int vpl, const void* q, const void* k, const void* qw,
                                       const void* kw, const float* ang, void* qo, void* ko, int n_rows, int D,
                                       const int* strides, const unsigned* divisors, float eps, int has_rope,
                                       int tpr, int block, int grid, cudaStream_t stream) {
  using namespace tpfuse;
  if (D % 2 != 0 || block % 32) return int(cudaErrorInvalidValue);
  const RowStrides sq{strides[0], strides[1], strides[2]}, sk{strides[3], strides[4], strides[5]};
  const RowStrides sqo{strides[6], strides[7], strides[8]}, sko{strides[9], strides[10], strides[11]};
  const FastDiv H{divisors[0], divisors[1], divisors[2]}, S{divisors[3], divisors[4], divisors[5]};
  cudaError_t err;
  switch (dtype) {
    case kFloat32: err = launch<float, 4>(tpr, vpl, vector, q, k, qw, kw, ang, qo, ko, n_rows, H, S, D, sq, sk, sqo,
                                          sko, eps, has_rope, block, grid, stream); break;
    case kFloat16: err = launch<__half, 8>(tpr, vpl, vector, q, k, qw, kw, ang, qo, ko, n_rows, H, S, D, sq, sk, sqo,
                                           sko, eps, has_rope, block, grid, stream); break;
    case kBFloat16: err = launch<__nv_bfloat16, 8>(tpr, vpl, vector, q, k, qw, kw, ang, qo, ko, n_rows, H, S, D, sq, sk,
                                                   sqo, sko, eps, has_rope, block, grid, stream); break;
    default: err = cudaErrorInvalidValue;
  }
  return int(err);
}
