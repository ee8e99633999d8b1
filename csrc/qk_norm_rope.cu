// Per-head RMSNorm (learnable scale) + RoPE on interleaved pairs, forward, for Q and K.
//
// Angles come as the compact [2, S, D/2] fp32 table (cos plane, sin plane; one angle per pair) that the Python
// launcher builds on the device (tpfuse.kernels._rope.angle_table).
//
// Vector kernel (16-byte aligned rows, D = TPR * VPL * VEC): a group of TPR lanes owns one (b, s, h) row, a lane VPL
// vectors of VEC consecutive features (VEC/2 RoPE pairs each, so the partner is in the lane's own registers);
// two vectors per lane (D = 128 bf16: 8 lanes) spend one shuffle level less per row than one (16 lanes). One lane does the Q row
// and the K row of the same (b, s, h), so the angles are read once for both, and ROWS rows of each in turn, so
// its RMSNorm scales are read once for all of them. 32-bit index math; (b, s, h) from the row index with two
// multiply-high divisions (FastDiv) for a lane's first row, then a carry step per row. Sums are TPR-lane xor
// shuffles.
//
// Scalar kernel (rows not 16-byte aligned, or D not TPR * VEC for a supported TPR): a pair per lane per step.
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

template <typename T>
__global__ void qk_norm_rope_scalar_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ qw, const T* __restrict__ kw,
                                           const float* __restrict__ ang, T* __restrict__ qo, T* __restrict__ ko,
                                           int n_rows, FastDiv H, FastDiv S, int D, RowStrides sq, RowStrides sk,
                                           RowStrides sqo, RowStrides sko, float eps, int has_rope, int tpr) {
  // One group of tpr lanes per row of Q (rows [0, n_rows)) or of K (rows [n_rows, 2 n_rows)).
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) / tpr;
  const int lane = threadIdx.x % tpr;
  const bool active = row < 2 * n_rows;
  const bool is_k = row >= n_rows;
  const RowIndex at = split_row(!active ? 0 : (is_k ? row - n_rows : row), H, S);
  const T* x = (is_k ? k : q) + offset(is_k ? sk : sq, at);
  T* y = (is_k ? ko : qo) + offset(is_k ? sko : sqo, at);
  const T* w = is_k ? kw : qw;
  const int d_end = active ? D : 0;
  float ss = 0.f;
  for (int d = 2 * lane; d < d_end; d += 2 * tpr) {
    const float a = to_float(x[d]), c = to_float(x[d + 1]);
    ss += a * a + c * c;
  }
  const float rstd = rsqrtf(group_sum(ss, tpr) / D + eps);
  const float* cr = has_rope ? ang + at.s * (D / 2) : nullptr;
  const float* sr = has_rope ? cr + int(S.d) * (D / 2) : nullptr;
  for (int d = 2 * lane; d < d_end; d += 2 * tpr) {
    const float e = to_float(x[d]) * rstd * to_float(w[d]);
    const float o = to_float(x[d + 1]) * rstd * to_float(w[d + 1]);
    const float c = has_rope ? cr[d / 2] : 1.f, s = has_rope ? sr[d / 2] : 0.f;
    y[d] = from_float<T>(e * c - o * s);
    y[d + 1] = from_float<T>(o * c + e * s);
  }
}

template <typename T, int VEC>
static cudaError_t launch(int tpr, int vpl, int vector, const void* q, const void* k, const void* qw, const void* kw,
                          const float* ang, void* qo, void* ko, int n_rows, FastDiv H, FastDiv S, int D,
                          RowStrides sq, RowStrides sk, RowStrides sqo, RowStrides sko, float eps, int has_rope,
                          int block, int grid, cudaStream_t stream) {
#define TPFUSE_QKR_ARGS (const T*)q, (const T*)k, (const T*)qw, (const T*)kw, ang, (T*)qo, (T*)ko, n_rows, H, S
#define TPFUSE_QKR_VEC(TPR, VPL)                                                                       \
  if (tpr == TPR && vpl == VPL) {                                                                        \
    if (has_rope)                                                                                        \
      qk_norm_rope_vec_kernel<T, VEC, TPR, VPL, 4, true><<<grid, block, 0, stream>>>(TPFUSE_QKR_ARGS, sq, sk, \
                                                                                      sqo, sko, eps);    \
    else                                                                                                 \
      qk_norm_rope_vec_kernel<T, VEC, TPR, VPL, 4, false><<<grid, block, 0, stream>>>(TPFUSE_QKR_ARGS, sq, sk,\
                                                                                       sqo, sko, eps);   \
    return cudaGetLastError();                                                                           \
  }
  if (!vector) {
    qk_norm_rope_scalar_kernel<T><<<grid, block, 0, stream>>>(TPFUSE_QKR_ARGS, D, sq, sk, sqo, sko, eps, has_rope,
                                                               tpr);
    return cudaGetLastError();
  }
  TPFUSE_QKR_VEC(8, 2) TPFUSE_QKR_VEC(16, 2) TPFUSE_QKR_VEC(8, 1) TPFUSE_QKR_VEC(16, 1) TPFUSE_QKR_VEC(32, 1)
  return cudaErrorInvalidValue;
#undef TPFUSE_QKR_VEC
#undef TPFUSE_QKR_ARGS
}

}  // namespace tpfuse

// Launch configuration (vector or scalar kernel, lanes per row, block, grid, fast divisors) is chosen by the Python
// launcher (tested on the CPU); this only dispatches. Returns a cudaError_t code (0: success).
// strides: q (b, s, h), k (b, s, h), qo (b, s, h), ko (b, s, h); divisors: H then S as (d, mul, shr).
extern "C" int tpfuse_qk_norm_rope_fwd(int dtype, int vector, int vpl, const void* q, const void* k, const void* qw,
                                       const void* kw, const float* ang, void* qo, void* ko, int n_rows, int D,
                                       const int* strides, const unsigned* divisors, float eps, int has_rope,
                                       int tpr, int block, int grid, cudaStream_t stream) {
  using namespace tpfuse;
  if (D % 2 != 0 || tpr < 1 || tpr > 32 || (tpr & (tpr - 1)) || block % 32) return int(cudaErrorInvalidValue);
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
