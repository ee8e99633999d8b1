// Per-head RMSNorm (learnable scale) + RoPE on interleaved pairs, forward, for Q and K.
//
// One group of `tpr` lanes ("threads per row", a power of two <= 32) owns one (b, s, h) row of Q or of K; a warp
// holds 32 / tpr rows. Each lane moves VEC elements per access (16 bytes for VEC = 8 x 16-bit or 4 x fp32) and
// walks the row in steps of tpr * VEC; elements past the last full vector (D % VEC) are a scalar tail handled a
// pair at a time. VEC = 1 (rows not 16-byte aligned) is the scalar tail alone. RoPE pairs (2i, 2i+1) never straddle a vector (VEC is even, vectors start at even offsets), so
// each lane rotates its own registers. Two passes over the row: sum of squares, then normalize/rotate/store (the
// second read is an L1 hit: a row is <= 512 bytes). No shared memory; fp32 math in registers.
#include "common.cuh"

namespace tpfuse {

struct RowStrides {
  int64_t b, s, h;  // element strides of [B, S, H, D]; the last dim is contiguous
};

template <typename T, int VEC>
__global__ void qk_norm_rope_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ qw,
                                        const T* __restrict__ kw, const float* __restrict__ cos,
                                        const float* __restrict__ sin, T* __restrict__ qo, T* __restrict__ ko,
                                        int64_t n_rows, int S, int H, int D, RowStrides sq, RowStrides sk,
                                        RowStrides sqo, RowStrides sko, int64_t cos_stride, float eps, int has_rope,
                                        int tpr) {
  const int64_t gthread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = gthread / tpr;  // rows [0, n_rows) are Q, [n_rows, 2 n_rows) are K
  const int lane = threadIdx.x % tpr;
  // Rows past the end stay to the shuffles (a full-mask __shfl_xor_sync needs every lane of the warp) with no
  // elements of their own.
  const bool active = row < 2 * n_rows;
  const bool is_k = row >= n_rows;
  const int64_t r = !active ? 0 : (is_k ? row - n_rows : row);
  const int64_t b = r / (int64_t(S) * H), s = (r / H) % S, h = r % H;
  const RowStrides si = is_k ? sk : sq, so = is_k ? sko : sqo;
  const T* x = (is_k ? k : q) + b * si.b + s * si.s + h * si.h;
  T* y = (is_k ? ko : qo) + b * so.b + s * so.s + h * so.h;
  const T* w = is_k ? kw : qw;
  const int d_end = active ? D : 0;
  const int d_vec = VEC >= 2 ? (d_end / VEC) * VEC : 0;  // VEC = 1: every pair goes through the scalar tail

  float ss = 0.f;
  for (int d = lane * VEC; d < d_vec; d += tpr * VEC) {
    float v[VEC];
    load_vec<T, VEC>(x + d, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) ss += v[i] * v[i];
  }
  for (int d = d_vec + 2 * lane; d < d_end; d += 2 * tpr) {
    float a = to_float(x[d]), c = to_float(x[d + 1]);
    ss += a * a + c * c;
  }
  const float rstd = rsqrtf(group_sum(ss, tpr) / D + eps);
  const float* cr = cos + s * cos_stride;
  const float* sr = sin + s * cos_stride;

  for (int d = lane * VEC; d < d_vec; d += tpr * VEC) {
    float v[VEC], g[VEC], out[VEC];
    load_vec<T, VEC>(x + d, v);
    load_vec<T, VEC>(w + d, g);
#pragma unroll
    for (int i = 0; i + 1 < VEC; i += 2) {
      const float e = v[i] * rstd * g[i], o = v[i + 1] * rstd * g[i + 1];
      if (has_rope) {
        out[i] = e * cr[d + i] - o * sr[d + i];
        out[i + 1] = o * cr[d + i + 1] + e * sr[d + i + 1];
      } else {
        out[i] = e;
        out[i + 1] = o;
      }
    }
    store_vec<T, VEC>(y + d, out);
  }
  for (int d = d_vec + 2 * lane; d < d_end; d += 2 * tpr) {  // scalar tail, one pair per step
    const float e = to_float(x[d]) * rstd * to_float(w[d]);
    const float o = to_float(x[d + 1]) * rstd * to_float(w[d + 1]);
    y[d] = from_float<T>(has_rope ? e * cr[d] - o * sr[d] : e);
    y[d + 1] = from_float<T>(has_rope ? o * cr[d + 1] + e * sr[d + 1] : o);
  }
}

template <typename T>
static cudaError_t launch(int vec, const void* q, const void* k, const void* qw, const void* kw, const float* cos,
                          const float* sin, void* qo, void* ko, int64_t n_rows, int S, int H, int D, RowStrides sq,
                          RowStrides sk, RowStrides sqo, RowStrides sko, int64_t cos_stride, float eps, int has_rope,
                          int tpr, int block, int64_t grid, cudaStream_t stream) {
#define TPFUSE_QKR_LAUNCH(V)                                                                                   \
  qk_norm_rope_fwd_kernel<T, V><<<dim3(unsigned(grid)), dim3(block), 0, stream>>>(                            \
      (const T*)q, (const T*)k, (const T*)qw, (const T*)kw, cos, sin, (T*)qo, (T*)ko, n_rows, S, H, D, sq, sk, \
      sqo, sko, cos_stride, eps, has_rope, tpr)
  switch (vec) {
    case 8: TPFUSE_QKR_LAUNCH(8); break;
    case 4: TPFUSE_QKR_LAUNCH(4); break;
    case 1: TPFUSE_QKR_LAUNCH(1); break;
    default: return cudaErrorInvalidValue;
  }
#undef TPFUSE_QKR_LAUNCH
  return cudaGetLastError();
}

}  // namespace tpfuse

// Launch configuration (vec, tpr, block, grid) is chosen by the Python launcher (tested on the CPU); this only
// dispatches on dtype and vector width. Returns a cudaError_t code (0: success).
extern "C" int tpfuse_qk_norm_rope_fwd(int dtype, int vec, const void* q, const void* k, const void* qw,
                                       const void* kw, const float* cos, const float* sin, void* qo, void* ko,
                                       int64_t B, int64_t S, int64_t H, int64_t D, const int64_t* strides,
                                       int64_t cos_stride, float eps, int has_rope, int tpr, int block,
                                       int64_t grid, cudaStream_t stream) {
  using namespace tpfuse;
  if (D % 2 != 0 || tpr < 1 || tpr > 32 || (tpr & (tpr - 1)) || block % tpr) return int(cudaErrorInvalidValue);
  // strides: q (b, s, h), k (b, s, h), qo (b, s, h), ko (b, s, h)
  RowStrides sq{strides[0], strides[1], strides[2]}, sk{strides[3], strides[4], strides[5]};
  RowStrides sqo{strides[6], strides[7], strides[8]}, sko{strides[9], strides[10], strides[11]};
  const int64_t n_rows = B * S * H;
  cudaError_t err;
  switch (dtype) {
    case kFloat32: err = launch<float>(vec, q, k, qw, kw, cos, sin, qo, ko, n_rows, int(S), int(H), int(D), sq, sk,
                                       sqo, sko, cos_stride, eps, has_rope, tpr, block, grid, stream); break;
    case kFloat16: err = launch<__half>(vec, q, k, qw, kw, cos, sin, qo, ko, n_rows, int(S), int(H), int(D), sq, sk,
                                        sqo, sko, cos_stride, eps, has_rope, tpr, block, grid, stream); break;
    case kBFloat16: err = launch<__nv_bfloat16>(vec, q, k, qw, kw, cos, sin, qo, ko, n_rows, int(S), int(H), int(D),
                                                sq, sk, sqo, sko, cos_stride, eps, has_rope, tpr, block, grid,
                                                stream); break;
    default: err = cudaErrorInvalidValue;
  }
  return int(err);
}
