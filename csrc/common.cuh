// Shared device helpers for tpfuse's CUDA kernels. Only CUDA's own headers: the CPU torch wheel's CUDA headers
// are incomplete, so these files must compile without torch (they are loaded through ctypes).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace tpfuse {

// dtype codes shared with the Python launchers (tpfuse.kernels.csrc.DTYPE_CODES)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC elements of T moved as one aligned access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  Vec<T, VEC> r = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(r.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  Vec<T, VEC> r;
#pragma unroll
  for (int i = 0; i < VEC; ++i) r.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = r;
}

// store_vec to global memory, a 16-byte vector as ONE st.global.v4: under register pressure (the 6144-wide
// layernorm) ptxas split the plain struct store into 4 x 32-bit STG when it could not place the four words in an
// aligned register quad.
template <typename T, int VEC>
__device__ __forceinline__ void store_vec_global(T* p, const float (&in)[VEC]) {
  if constexpr (sizeof(Vec<T, VEC>) == 16) {
    Vec<T, VEC> r;
#pragma unroll
    for (int i = 0; i < VEC; ++i) r.v[i] = from_float<T>(in[i]);
    uint4 u;
    memcpy(&u, &r, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
                 : "memory");
  } else {
    store_vec<T, VEC>(p, in);
  }
}

// 32-bit words of two 16-bit elements (element 2i in the low half: little-endian), for rows that are not 16-byte
// aligned: one 32-bit access instead of two 16-bit ones (LDG.E.U16/STG.E.U16: half the bytes per instruction).
template <typename T> __device__ __forceinline__ float2 word_to_float2(uint32_t w);
template <> __device__ __forceinline__ float2 word_to_float2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));  // bf16 -> fp32 is a shift
}
template <> __device__ __forceinline__ float2 word_to_float2<__half>(uint32_t w) {
  __half2 h;
  memcpy(&h, &w, 4);
  return __half22float2(h);
}
template <typename T> __device__ __forceinline__ uint32_t float2_to_word(float a, float b);  // one F2FP pack
template <> __device__ __forceinline__ uint32_t float2_to_word<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, 4);
  return w;
}
template <> __device__ __forceinline__ uint32_t float2_to_word<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, 4);
  return w;
}

// p, hidden from the optimiser: a lane-base pointer whose per-step offsets must stay immediates. Without it, nvcc
// folds the lane's index back into each access's address (the word kernel's predicates compare lane + step) and
// issues a 64-bit IMAD.WIDE per access instead of one [R+imm] load.
template <typename P>
__device__ __forceinline__ P* opaque(P* p) {
  asm("" : "+l"(p));
  return p;
}

// A plain (weak, write-back) 32-bit global store, for a pointer the optimiser cannot see is global (opaque above):
// st.global.b32 is STG.E, where a plain C++ store through it would be a generic ST.E.
__device__ __forceinline__ void store_global(uint32_t* p, uint32_t v) {
  asm volatile("st.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// The same, predicated in the instruction (@p STG): a C++ `if` around an asm store became a BSSY/BRA/BSYNC triple
// per store in the unrolled pair loops.
__device__ __forceinline__ void store_global_if(bool ok, uint32_t* p, uint32_t v) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p st.global.b32 [%0], %1;\n}" ::"l"(p), "r"(v),
               "r"(int(ok)) : "memory");
}
__device__ __forceinline__ void store_global_if(bool ok, float2* p, float2 v) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %3, 0;\n @p st.global.v2.f32 [%0], {%1, %2};\n}" ::"l"(p),
               "f"(v.x), "f"(v.y), "r"(int(ok)) : "memory");
}

// Sum over a group of `width` lanes (a power of two <= 32) that are contiguous within the warp.
__device__ __forceinline__ float group_sum(float x, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset, width);
  return x;
}

// n / d for 0 <= n < 2^31 without a division instruction sequence: q = umulhi(n, mul) >> shr, with (mul, shr)
// computed once on the host (tpfuse.kernels.cuda_backend.fast_divisor; d == 1 is mul = 0). The round-up
// multiplier mul = ceil(2^(31 + l) / d), l = ceil(log2 d), is exact for every n < 2^31.
struct FastDiv {
  uint32_t d, mul, shr;
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return mul == 0 ? n : __umulhi(n, mul) >> shr; }
};

}  // namespace tpfuse
