// (1 + scale) * LayerNorm(x) + shift (no affine), forward. fp32 math. shift/scale per (batch, feature) or, per
// token (FLUX.3, FLUX.2's KV-extract mode), per (batch, token, feature); a batch stride of 0 broadcasts one row.
//
// Vector kernel (D = WPR * 32 * NV * VEC exactly, every row 16-byte aligned): WPR warps own one (b, s) row and each
// lane holds NV 16-byte vectors of it in registers, so the row is read from DRAM once and the centred variance (no
// E[x^2] - mean^2 cancellation) is a second pass over registers. A block is 256 threads = 8 / WPR rows of one
// batch entry, TILES times in turn; per batch, it stages that entry's (1 + scale) and shift in shared memory as
// fp32 once for all its rows; per token, each row reads its own modulation rows. Row sums are warp shuffles (plus
// one shared-memory exchange when WPR > 1).
//
// Word kernel (the fallback: any D up to its capacity, rows not 16-byte aligned or widths off the vector shapes):
// the same layout in 32-bit words, two bf16/fp16 elements or one fp32 each, masked per lane; per batch, the
// modulation is staged as fp32 (1 + scale, shift) pairs. Rows starting at an odd element (a view at an odd offset,
// or every other row of an odd D) are realigned or run in fp32 by the launcher, so a word never straddles two
// rows and no 16-bit global access exists (tpfuse.kernels.cuda_backend).
//
// All index math is 32-bit (the launcher checks every extent against 2^31); 1/D comes from the host, so no
// division is compiled. Per-warp instruction counts are in csrc/README.md.
#include "common.cuh"

namespace tpfuse {

constexpr int kLnBlock = 256;
constexpr int kLnWarps = kLnBlock / 32;

struct LnStrides {
  int xb, xs, yb, ys;  // x and y: batch and token strides (elements; the feature dim is contiguous)
  int mb, ms;          // shift/scale (same strides for both): batch (0: broadcast) and token (0: per batch)
};

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

template <typename T, int VEC, int NV, int WPR, int TILES, bool PER_TOKEN>
__global__ void __launch_bounds__(kLnBlock) ln_mod_vec_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                                                              const T* __restrict__ scale, T* __restrict__ y, int S,
                                                              LnStrides st, float eps) {
  constexpr int D = WPR * 32 * NV * VEC, ROWS = kLnWarps / WPR;
  constexpr int STEP = WPR * 32 * VEC;  // elements between a lane's consecutive vectors: immediate offsets
  extern __shared__ float4 smem_v4[];
  float* smem = reinterpret_cast<float*>(smem_v4);  // per batch: [D] 1 + scale, [D] shift; then [8] scratch
  float* scratch = smem + (PER_TOKEN ? 0 : 2 * D);
  const int b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if constexpr (!PER_TOKEN) {
    // Lane-base pointers, constant offsets per step: one 64-bit address per pointer (an int index added per
    // access cost a LEA/LEA.HI.X/IADD3.X triple per vector: ~90 of 1291 instructions per warp at 12288).
    const T* sc = scale + (b * st.mb + int(threadIdx.x) * VEC);
    const T* sh = shift + (b * st.mb + int(threadIdx.x) * VEC);
    float* s1 = smem + threadIdx.x * VEC;
#pragma unroll
    for (int i = 0; i < (D + kLnBlock * VEC - 1) / (kLnBlock * VEC); ++i) {  // unrolled: D is a constant
      const int d = i * kLnBlock * VEC;
      if (d + int(threadIdx.x) * VEC < D) {
        float a[VEC], c[VEC];
        load_vec<T, VEC>(sc + d, a);
        load_vec<T, VEC>(sh + d, c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) a[j] += 1.f;
        store_vec<float, VEC>(s1 + d, a);
        store_vec<float, VEC>(s1 + D + d, c);
      }
    }
    __syncthreads();
  }

  const int col = ((warp % WPR) * 32 + lane) * VEC;  // this lane's first feature
#pragma unroll
  for (int t = 0; t < TILES; ++t) {
    const int s = (blockIdx.x * TILES + t) * ROWS + warp / WPR;
    const bool active = s < S;  // inactive warps still reach the barriers of the WPR > 1 reductions
    const int sr = active ? s : 0;  // their addresses stay in bounds (never dereferenced)
    const T* xr = x + (b * st.xb + sr * st.xs + col);
    float v[NV][VEC];
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {  // a warp's lanes cover 32 consecutive vectors
      if (active) {
        load_vec<T, VEC>(xr + j * STEP, v[j]);
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
    if (active) {
      T* yr = y + (b * st.yb + sr * st.ys + col);
      const T* scr = scale + (b * st.mb + sr * st.ms + col);  // per token: this row's modulation
      const T* shr = shift + (b * st.mb + sr * st.ms + col);
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        float a[VEC], c[VEC];
        if constexpr (PER_TOKEN) {
          load_vec<T, VEC>(scr + j * STEP, a);
          load_vec<T, VEC>(shr + j * STEP, c);
#pragma unroll
          for (int i = 0; i < VEC; ++i) a[i] += 1.f;
        } else {
          load_vec<float, VEC>(smem + col + j * STEP, a);
          load_vec<float, VEC>(smem + D + col + j * STEP, c);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[j][i] = v[j][i] * rstd * a[i] + c[i];
        store_vec_global<T, VEC>(yr + j * STEP, v[j]);
      }
    }
  }
}

// Word kernel (the fallback): the vector kernel's layout in 32-bit words, EPW elements each (2 for bf16/fp16, 1 for
// fp32), NW words per lane, any D up to the capacity WPR * 32 * NW * EPW: word j of a lane is in the row iff
// j * STEP < F - (lane's first word). The launcher guarantees every x, y and per-token modulation row starts at an
// even element (16-bit types: so a word never straddles two rows) and D % EPW == 0, and hands the per-batch
// modulation as 16-byte aligned rows padded to a multiple of 16 bytes (a tiny copy where it is not already).
// Lane-base pointers with constant per-step offsets and "step < words left" predicates (never lane + step, which
// CSE turns back into a 64-bit address per word): every access is an immediate-offset, predicated LDG/STG.
template <typename T, int NW, int WPR, int TILES, bool PER_TOKEN>
__global__ void __launch_bounds__(kLnBlock) ln_mod_word_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                                                               const T* __restrict__ scale, T* __restrict__ y,
                                                               int S, int D, LnStrides st, float inv_d, float eps) {
  constexpr int EPW = 4 / int(sizeof(T)), VEC = 16 / int(sizeof(T));
  constexpr int WORDS = WPR * 32 * NW, ROWS = kLnWarps / WPR, STEP = WPR * 32;
  // Per batch: mod[e] = (1 + scale, shift) of element e as fp32: a word's modulation is one 16-byte (EPW 2) or
  // 8-byte (fp32) shared load.
  extern __shared__ float4 smem_w4[];
  float2* mod = reinterpret_cast<float2*>(smem_w4);
  float* scratch = reinterpret_cast<float*>(smem_w4) + (PER_TOKEN ? 0 : 2 * EPW * WORDS);
  const int b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if constexpr (!PER_TOKEN) {
    const T* sc = scale + (b * st.mb + int(threadIdx.x) * VEC);
    const T* sh = shift + (b * st.mb + int(threadIdx.x) * VEC);
    float2* m = mod + threadIdx.x * VEC;
    const int left = D - int(threadIdx.x) * VEC;
#pragma unroll
    for (int i = 0; i < (WORDS * EPW + kLnBlock * VEC - 1) / (kLnBlock * VEC); ++i) {
      const int e = i * kLnBlock * VEC;
      if (e < left) {  // the padded row makes the whole vector readable
        float a[VEC], c[VEC];
        load_vec<T, VEC>(sc + e, a);
        load_vec<T, VEC>(sh + e, c);
#pragma unroll
        for (int k = 0; k < VEC; k += 2) {
          reinterpret_cast<float4*>(m + e)[k / 2] = make_float4(1.f + a[k], c[k], 1.f + a[k + 1], c[k + 1]);
        }
      }
    }
    __syncthreads();
  }

  const int i0 = (warp % WPR) * 32 + lane;  // this lane's first word
  const int F = D / EPW;                    // words per row (EPW is 1 or 2: a shift)
#pragma unroll  // unrolled, so the SASS longest path is the real per-warp count (TILES is 1 or 2)
  for (int t = 0; t < TILES; ++t) {
    const int s = (blockIdx.x * TILES + t) * ROWS + warp / WPR;
    const bool active = s < S;
    const int sr = active ? s : 0;  // inactive rows (still in the reductions' barriers) load nothing
    // Bit j: this lane's word j is in the row (j * STEP < F - i0). Each pass tests its bit with one LOP3; a compare
    // per word and pass made ptxas also spill the predicates into bit masks of its own (2 LOP3 more per word).
    const int rem = active ? F - i0 : 0;
    const int n_words = rem <= 0 ? 0 : min(NW, (rem + STEP - 1) / STEP);  // STEP: a power of two
    const uint64_t valid = n_words >= 64 ? ~0ull : (1ull << n_words) - 1;
    const uint32_t* xw = opaque(reinterpret_cast<const uint32_t*>(x + (b * st.xb + sr * st.xs)) + i0);
    float v[NW][EPW];
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NW; ++j) {
      const uint32_t w = (valid >> j) & 1 ? __ldg(xw + j * STEP) : 0u;  // padding words are 0: no sum predicate
      if constexpr (EPW == 2) {
        const float2 f = word_to_float2<T>(w);
        v[j][0] = f.x;
        v[j][EPW - 1] = f.y;
      } else {
        v[j][0] = __uint_as_float(w);
      }
#pragma unroll
      for (int e = 0; e < EPW; ++e) sum += v[j][e];
    }
    // __fmul_rn: a separate product, so the centring below is one FADD per element, not an FFMA that re-reads
    // 1/D from the constant bank (ptxas rematerialised it per word under register pressure).
    const float mean = __fmul_rn(row_sum<WPR>(sum, scratch, warp, lane), inv_d);
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NW; ++j) {
      if ((valid >> j) & 1) {  // padding words stay out of the variance
#pragma unroll
        for (int e = 0; e < EPW; ++e) {
          v[j][e] -= mean;
          ss += v[j][e] * v[j][e];
        }
      }
    }
    const float rstd = rsqrtf(row_sum<WPR>(ss, scratch, warp, lane) * inv_d + eps);
    if (!active) continue;
    uint32_t* yw = opaque(reinterpret_cast<uint32_t*>(y + (b * st.yb + sr * st.ys)) + i0);
    // Per token: this row's modulation words.
    const uint32_t* scw = opaque(reinterpret_cast<const uint32_t*>(scale + (b * st.mb + sr * st.ms)) + i0);
    const uint32_t* shw = opaque(reinterpret_cast<const uint32_t*>(shift + (b * st.mb + sr * st.ms)) + i0);
    const float2* m = mod + EPW * i0;
#pragma unroll
    for (int j = 0; j < NW; ++j) {
      if ((valid >> j) & 1) {
        float2 m0, m1;  // (1 + scale, shift) of the word's elements
        if constexpr (PER_TOKEN) {
          const uint32_t wa = __ldg(scw + j * STEP), wc = __ldg(shw + j * STEP);
          if constexpr (EPW == 2) {
            const float2 a = word_to_float2<T>(wa), c = word_to_float2<T>(wc);
            m0 = make_float2(1.f + a.x, c.x);
            m1 = make_float2(1.f + a.y, c.y);
          } else {
            m0 = m1 = make_float2(1.f + __uint_as_float(wa), __uint_as_float(wc));
          }
        } else if constexpr (EPW == 2) {
          const float4 q = reinterpret_cast<const float4*>(m)[j * STEP];
          m0 = make_float2(q.x, q.y);
          m1 = make_float2(q.z, q.w);
        } else {
          m0 = m1 = m[j * STEP];
        }
        if constexpr (EPW == 2) {
          store_global(yw + j * STEP,
                       float2_to_word<T>(v[j][0] * rstd * m0.x + m0.y, v[j][EPW - 1] * rstd * m1.x + m1.y));
        } else {
          store_global(yw + j * STEP, __float_as_uint(v[j][0] * rstd * m0.x + m0.y));
        }
      }
    }
  }
}

template <typename T, int VEC, int NV, int WPR, int TILES, bool PER_TOKEN>
static cudaError_t launch_vec(const void* x, const void* shift, const void* scale, void* y, int B, int S, int D,
                              const LnStrides& st, float eps, cudaStream_t stream) {
  constexpr int CAP = WPR * 32 * NV * VEC, ROWS = kLnWarps / WPR;
  if (D != CAP) return cudaErrorInvalidValue;
  const size_t smem = ((PER_TOKEN ? 0 : 2 * CAP) + kLnWarps) * sizeof(float);
  auto kernel = ln_mod_vec_kernel<T, VEC, NV, WPR, TILES, PER_TOKEN>;
  if (smem > 48 * 1024) {  // dev's 6144 features: 48 KB of fp32 modulation plus the scratch
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3((S + ROWS * TILES - 1) / (ROWS * TILES), B), kLnBlock, smem, stream>>>(
      (const T*)x, (const T*)shift, (const T*)scale, (T*)y, S, st, eps);
  return cudaGetLastError();
}

template <typename T, int NW, int WPR, int TILES, bool PER_TOKEN>
static cudaError_t launch_word(const void* x, const void* shift, const void* scale, void* y, int B, int S, int D,
                               const LnStrides& st, float eps, cudaStream_t stream) {
  constexpr int EPW = 4 / int(sizeof(T)), WORDS = WPR * 32 * NW, ROWS = kLnWarps / WPR;
  if (D < 1 || D > WORDS * EPW || D % EPW) return cudaErrorInvalidValue;
  const size_t smem = (PER_TOKEN ? 0 : size_t(WORDS) * 2 * EPW * sizeof(float)) + kLnWarps * sizeof(float);
  auto kernel = ln_mod_word_kernel<T, NW, WPR, TILES, PER_TOKEN>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3((S + ROWS * TILES - 1) / (ROWS * TILES), B), kLnBlock, smem, stream>>>(
      (const T*)x, (const T*)shift, (const T*)scale, (T*)y, S, D, st, 1.0f / float(D), eps);  // host division
  return cudaGetLastError();
}

// The instantiated shapes, mirrored by tpfuse.kernels.cuda_backend.LN_VEC_SHAPES / LN_WORD_SHAPES (tested).
// Vector kernel: (NV 16-byte vectors per lane, WPR, TILES). Word kernel: (NW 32-bit words per lane, WPR, TILES),
// the same bytes per lane. TILES = 2 where the per-block work (staging the modulation, the per-row setup) is a
// large share of one pass over the block's rows: 4-warp rows (2 rows per block), short rows (1024 bf16) and the
// word kernel's 2-warp rows (measured per shape in csrc/README.md).
#define TPFUSE_LN_VEC_SHAPES(X) \
  X(4, 1, 2) X(8, 1, 1) X(12, 1, 1) X(16, 1, 1) X(12, 2, 1) X(16, 2, 1) X(12, 4, 2) X(16, 4, 2)
#define TPFUSE_LN_WORD_SHAPES(X) X(32, 1, 2) X(48, 1, 2) X(64, 1, 2) X(48, 2, 2) X(64, 2, 2)
// fp32 only (a word is one element, so these are 6144-16384 features): 16-bit rows over 8192 features that the
// vector kernel cannot take go through fp32 (tpfuse.kernels.cuda_backend), never a 16-bit access.
#define TPFUSE_LN_WORD_SHAPES_FP32(X) X(48, 4, 2) X(64, 4, 2) X(48, 8, 1) X(64, 8, 1)

template <typename T, int VEC>
static cudaError_t launch(int kind, int nv, int wpr, int tiles, bool per_token, const void* x, const void* shift,
                          const void* scale, void* y, int B, int S, int D, const LnStrides& st, float eps,
                          cudaStream_t stream) {
#define TPFUSE_LN_VEC(NV, WPR, TILES)                                                                          \
  if (kind == 0 && nv == NV && wpr == WPR && tiles == TILES)                                                 \
    return per_token ? launch_vec<T, VEC, NV, WPR, TILES, true>(x, shift, scale, y, B, S, D, st, eps, stream)    \
                     : launch_vec<T, VEC, NV, WPR, TILES, false>(x, shift, scale, y, B, S, D, st, eps, stream);
#define TPFUSE_LN_WORD(NW, WPR, TILES)                                                                         \
  if (kind == 1 && nv == NW && wpr == WPR && tiles == TILES)                                                 \
    return per_token ? launch_word<T, NW, WPR, TILES, true>(x, shift, scale, y, B, S, D, st, eps, stream)        \
                     : launch_word<T, NW, WPR, TILES, false>(x, shift, scale, y, B, S, D, st, eps, stream);
  TPFUSE_LN_VEC_SHAPES(TPFUSE_LN_VEC)
  TPFUSE_LN_WORD_SHAPES(TPFUSE_LN_WORD)
  if constexpr (sizeof(T) == 4) {
    TPFUSE_LN_WORD_SHAPES_FP32(TPFUSE_LN_WORD)
  }
#undef TPFUSE_LN_WORD
#undef TPFUSE_LN_VEC
  return cudaErrorInvalidValue;
}

}  // namespace tpfuse

// kind: 0 the vector kernel (D == its capacity, 16-byte aligned rows), 1 the word kernel (D <= its capacity, rows
// at even elements); (nv, wpr, tiles): an entry of that kind's shape table (nv: vectors or words per lane);
// per_token: a shift/scale row per token. strides: x (b, s), y (b, s), shift/scale (b, s) (0 to broadcast).
// Returns a cudaError_t code.
extern "C" int tpfuse_layernorm_modulate_fwd(int dtype, int kind, int nv, int wpr, int tiles, int per_token,
                                             const void* x, const void* shift, const void* scale, void* y, int B,
                                             int S, int D, const int* strides, float eps, cudaStream_t stream) {
  using namespace tpfuse;
  if (kind != 0 && kind != 1) return int(cudaErrorInvalidValue);
  const LnStrides st{strides[0], strides[1], strides[2], strides[3], strides[4], strides[5]};
  cudaError_t err;
  switch (dtype) {
    case kFloat32: err = launch<float, 4>(kind, nv, wpr, tiles, per_token, x, shift, scale, y, B, S, D, st, eps,
                                          stream);
      break;
    case kFloat16: err = launch<__half, 8>(kind, nv, wpr, tiles, per_token, x, shift, scale, y, B, S, D, st, eps,
                                           stream);
      break;
    case kBFloat16: err = launch<__nv_bfloat16, 8>(kind, nv, wpr, tiles, per_token, x, shift, scale, y, B, S, D, st,
                                                   eps, stream);
      break;
    default: err = cudaErrorInvalidValue;
  }
  return int(err);
}
