// (1 + scale) * LayerNorm(x) + shift (no affine), forward. fp32 math.
//
// Vector kernel (16-byte aligned rows, D = WPR * 32 * NV * VEC): WPR warps own one (b, s) row and each lane holds
// NV 16-byte vectors of it in registers, so the row is read from DRAM once and the centred variance (no
// E[x^2] - mean^2 cancellation) is a second pass over registers. A block is 256 threads = 8 / WPR rows of one batch
// entry (grid: token blocks x B), and stages that entry's (1 + scale) and shift in shared memory as fp32 once for
// all its rows. 32-bit index math; row sums are warp shuffles (plus one shared-memory exchange when WPR > 1).
//
// Generic kernel (other widths, or rows not 16-byte aligned): one block per row, three passes over the row
// (the second and third from L1/L2), a scalar tail for D % VEC.
#include "common.cuh"

namespace tpfuse {

constexpr int kLnBlock = 256;

template <int WPR>
__device__ __forceinline__ float row_sum(float x, float* scratch, int warp, int lane) {
  x = group_sum(x, 32);
  if (WPR == 1) return x;
  __syncthreads();  // scratch is reused between calls
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  const int first = warp - warp % WPR;
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < WPR; ++i) total += scratch[first + i];
  return total;
}

template <typename T, int VEC, int NV, int WPR>
__global__ void ln_mod_vec_kernel(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                                  T* __restrict__ y, int S, int sxb, int sxs, int syb, int sys, int smb, float eps) {
  constexpr int D = WPR * 32 * NV * VEC, ROWS = kLnBlock / 32 / WPR;
  extern __shared__ float smem[];  // [D] 1 + scale, [D] shift, [8] reduction scratch
  float* scale1 = smem;
  float* shift_s = smem + D;
  float* scratch = smem + 2 * D;
  const int b = blockIdx.y;
#pragma unroll
  for (int i = 0; i < (D + kLnBlock * VEC - 1) / (kLnBlock * VEC); ++i) {  // unrolled: D is a constant
    const int d = (i * kLnBlock + threadIdx.x) * VEC;
    if (d < D) {
      float a[VEC], c[VEC];
      load_vec<T, VEC>(scale + b * smb + d, a);
      load_vec<T, VEC>(shift + b * smb + d, c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) a[j] += 1.f;
      store_vec<float, VEC>(scale1 + d, a);
      store_vec<float, VEC>(shift_s + d, c);
    }
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int s = blockIdx.x * ROWS + warp / WPR;
  const bool active = s < S;  // inactive warps still reach the barriers of the WPR > 1 reductions
  const T* xr = x + b * sxb + s * sxs;
  T* yr = y + b * syb + s * sys;
  float v[NV][VEC];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int d = ((j * WPR + warp % WPR) * 32 + lane) * VEC;  // a warp's lanes cover 32 consecutive vectors
    if (active) {
      load_vec<T, VEC>(xr + d, v[j]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[j][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[j][i];
  }
  const float mean = row_sum<WPR>(sum, scratch, warp, lane) * (1.f / D);
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      v[j][i] -= mean;
      ss += v[j][i] * v[j][i];
    }
  }
  const float rstd = rsqrtf(row_sum<WPR>(ss, scratch, warp, lane) * (1.f / D) + eps);
  if (!active) return;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int d = ((j * WPR + warp % WPR) * 32 + lane) * VEC;
    float a[VEC], c[VEC];
    load_vec<float, VEC>(scale1 + d, a);
    load_vec<float, VEC>(shift_s + d, c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[j][i] = v[j][i] * rstd * a[i] + c[i];
    store_vec_global<T, VEC>(yr + d, v[j]);
  }
}

__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  x = group_sum(x, 32);
  __syncthreads();  // scratch is reused between calls
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : 0.f;
  return group_sum(x, 32);
}

template <typename T, int VEC>
__global__ void ln_mod_generic_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                                      const T* __restrict__ scale, T* __restrict__ y, int S, int D, int sxb, int sxs,
                                      int syb, int sys, int smb, float eps) {
  __shared__ float scratch[32];
  const int b = blockIdx.y, s = blockIdx.x;
  const T* xr = x + b * sxb + s * sxs;
  T* yr = y + b * syb + s * sys;
  const T* sh = shift + b * smb;
  const T* sc = scale + b * smb;
  const int step = blockDim.x * VEC, d_vec = (D / VEC) * VEC;

  float sum = 0.f;
  for (int d = threadIdx.x * VEC; d < d_vec; d += step) {
    float v[VEC];
    load_vec<T, VEC>(xr + d, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[i];
  }
  for (int d = d_vec + threadIdx.x; d < D; d += blockDim.x) sum += to_float(xr[d]);
  const float mean = block_sum(sum, scratch) / D;

  float ss = 0.f;
  for (int d = threadIdx.x * VEC; d < d_vec; d += step) {
    float v[VEC];
    load_vec<T, VEC>(xr + d, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) ss += (v[i] - mean) * (v[i] - mean);
  }
  for (int d = d_vec + threadIdx.x; d < D; d += blockDim.x) {
    const float c = to_float(xr[d]) - mean;
    ss += c * c;
  }
  const float rstd = rsqrtf(block_sum(ss, scratch) / D + eps);

  for (int d = threadIdx.x * VEC; d < d_vec; d += step) {
    float v[VEC], a[VEC], c[VEC];
    load_vec<T, VEC>(xr + d, v);
    load_vec<T, VEC>(sh + d, a);
    load_vec<T, VEC>(sc + d, c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = (v[i] - mean) * rstd * (1.f + c[i]) + a[i];
    store_vec<T, VEC>(yr + d, v);
  }
  for (int d = d_vec + threadIdx.x; d < D; d += blockDim.x) {
    yr[d] = from_float<T>((to_float(xr[d]) - mean) * rstd * (1.f + to_float(sc[d])) + to_float(sh[d]));
  }
}

template <typename T, int VEC, int NV, int WPR>
static cudaError_t launch_vec(const void* x, const void* shift, const void* scale, void* y, int B, int S,
                              const int* st, float eps, cudaStream_t stream) {
  constexpr int D = WPR * 32 * NV * VEC, ROWS = kLnBlock / 32 / WPR;
  const size_t smem = (2 * D + kLnBlock / 32) * sizeof(float);
  auto kernel = ln_mod_vec_kernel<T, VEC, NV, WPR>;
  if (smem > 48 * 1024) {  // dev's 6144 features: 48 KB of fp32 modulation plus the scratch
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3((S + ROWS - 1) / ROWS, B), kLnBlock, smem, stream>>>(
      (const T*)x, (const T*)shift, (const T*)scale, (T*)y, S, st[0], st[1], st[2], st[3], st[4], eps);
  return cudaGetLastError();
}

template <typename T, int VEC>
static cudaError_t launch(int nv, int wpr, int vec, const void* x, const void* shift, const void* scale, void* y,
                          int B, int S, int D, const int* st, float eps, int block, cudaStream_t stream) {
  if (nv) {
    if (vec != VEC) return cudaErrorInvalidValue;
#define TPFUSE_LN_VEC(NV, WPR)                                                                \
  if (nv == NV && wpr == WPR) return launch_vec<T, VEC, NV, WPR>(x, shift, scale, y, B, S, st, eps, stream);
    TPFUSE_LN_VEC(4, 1) TPFUSE_LN_VEC(8, 1) TPFUSE_LN_VEC(12, 1) TPFUSE_LN_VEC(16, 1)
    TPFUSE_LN_VEC(12, 2) TPFUSE_LN_VEC(16, 2) TPFUSE_LN_VEC(12, 4) TPFUSE_LN_VEC(16, 4)
#undef TPFUSE_LN_VEC
    return cudaErrorInvalidValue;
  }
#define TPFUSE_LN_GENERIC(V)                                                                        \
  ln_mod_generic_kernel<T, V><<<dim3(unsigned(S), unsigned(B)), dim3(block), 0, stream>>>(          \
      (const T*)x, (const T*)shift, (const T*)scale, (T*)y, S, D, st[0], st[1], st[2], st[3], st[4], eps)
  switch (vec) {
    case VEC: TPFUSE_LN_GENERIC(VEC); break;
    case 1: TPFUSE_LN_GENERIC(1); break;
    default: return cudaErrorInvalidValue;
  }
#undef TPFUSE_LN_GENERIC
  return cudaGetLastError();
}

}  // namespace tpfuse

// nv, wpr: the vector kernel's vectors per lane and warps per row (nv = 0: the generic kernel with `vec` elements
// per access and `block` threads per row). strides: x (b, s), y (b, s), shift/scale batch stride (0 to
// broadcast). Returns a cudaError_t code.
extern "C" int tpfuse_layernorm_modulate_fwd(int dtype, int nv, int wpr, int vec, const void* x, const void* shift,
                                             const void* scale, void* y, int B, int S, int D, const int* strides,
                                             float eps, int block, cudaStream_t stream) {
  using namespace tpfuse;
  if (!nv && (block < 32 || block > 1024 || block % 32)) return int(cudaErrorInvalidValue);
  cudaError_t err;
  switch (dtype) {
    case kFloat32: err = launch<float, 4>(nv, wpr, vec, x, shift, scale, y, B, S, D, strides, eps, block, stream);
      break;
    case kFloat16: err = launch<__half, 8>(nv, wpr, vec, x, shift, scale, y, B, S, D, strides, eps, block, stream);
      break;
    case kBFloat16: err = launch<__nv_bfloat16, 8>(nv, wpr, vec, x, shift, scale, y, B, S, D, strides, eps, block,
                                                   stream);
      break;
    default: err = cudaErrorInvalidValue;
  }
  return int(err);
}
