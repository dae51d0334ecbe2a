/*
 * alexnet_half.cuh — storage types for the kernels: f32 (`float`), f16 (IEEE binary16 bits in
 * an `unsigned short`) and bf16 (bfloat16 bits in `alexnet_bf16`), plus the small device helpers
 * every module shares.
 *
 * The f16 conversions are inline PTX rather than cuda_fp16.h, which NVRTC cannot find without an
 * include path to the toolkit: with this file the kernels compile with nvcc and with NVRTC from
 * an embedded source alone. Arithmetic always happens in f32; only loads and stores convert.
 * Compiled as host C++ for the tests (alexnet_host.h defines ALEXNET_HOST_EMULATION), the
 * conversions use that header's software twins instead of the PTX.
 */
#ifndef ALEXNET_HALF_CUH
#define ALEXNET_HALF_CUH

#include "alexnet_abi.h"

/* binary16 bits -> f32 (exact). */
static __device__ __forceinline__ float alexnet_h2f(unsigned short h)
{
#ifdef ALEXNET_HOST_EMULATION
    return alexnet_host::half_to_float(h); /* the host twin (alexnet_host.h) */
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

/* f32 -> binary16 bits, round to nearest even (overflow gives infinity, NaN stays NaN). */
static __device__ __forceinline__ unsigned short alexnet_f2h(float f)
{
#ifdef ALEXNET_HOST_EMULATION
    return alexnet_host::float_to_half(f);
#else
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

/*
 * bfloat16 storage: the upper 16 bits of an f32, in a one-member struct so that overloads and
 * templates tell it apart from f16's `unsigned short` (same size and alignment: 2 bytes).
 */
typedef struct alexnet_bf16 {
    unsigned short bits;
} alexnet_bf16;

/* bfloat16 -> f32 (exact: the bits are the f32's upper half). */
static __device__ __forceinline__ float alexnet_bf2f(alexnet_bf16 b)
{
    return __uint_as_float((unsigned int)b.bits << 16);
}

/*
 * f32 -> bfloat16, round to nearest even (overflow gives infinity); a NaN stays NaN, made quiet:
 * bit for bit the CPU's `half::bf16::from_f32`. Integer arithmetic, so it needs no sm_80
 * instruction and the host build runs this same code.
 */
static __device__ __forceinline__ alexnet_bf16 alexnet_f2bf(float f)
{
    const unsigned int u = __float_as_uint(f);
    alexnet_bf16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u)
        b.bits = (unsigned short)((u >> 16) | 0x40u);
    else /* adds half an ulp, less one unless the kept part is odd: ties go to even */
        b.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return b;
}

/* Load any storage type as f32. */
static __device__ __forceinline__ float alexnet_load(float v) { return v; }
static __device__ __forceinline__ float alexnet_load(unsigned short v) { return alexnet_h2f(v); }
static __device__ __forceinline__ float alexnet_load(alexnet_bf16 v) { return alexnet_bf2f(v); }

/* Store an f32 into storage type T. */
template <typename T> __device__ __forceinline__ T alexnet_store(float v);
template <> __device__ __forceinline__ float alexnet_store<float>(float v) { return v; }
template <> __device__ __forceinline__ unsigned short alexnet_store<unsigned short>(float v)
{
    return alexnet_f2h(v);
}
template <> __device__ __forceinline__ alexnet_bf16 alexnet_store<alexnet_bf16>(float v)
{
    return alexnet_f2bf(v);
}

/* NaN test on the bits: independent of math headers and of any fast-math flag. */
static __device__ __forceinline__ bool alexnet_isnan(float v)
{
    return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
}

/* max(v, 0) with NaN kept (the CPU's `relu`): `v < 0` is false for NaN. */
static __device__ __forceinline__ float alexnet_relu(float v) { return v < 0.0f ? 0.0f : v; }

/* Grid-stride loop over [0, len) with index type I: correct for any grid and block size. */
#define ALEXNET_GRID_STRIDE(I, i, len)                                                           \
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)(len);                     \
         i += (I)blockDim.x * (I)gridDim.x)

/*
 * Whether a grid-stride loop over [0, len) can use 32-bit indices: every index and index +
 * stride then stays below 2^32. Kernels pick 32-bit arithmetic when it fits (64-bit division,
 * needed to split an index into coordinates, costs several times more) and 64-bit otherwise.
 */
static __device__ __forceinline__ bool alexnet_fits_u32(unsigned long long len)
{
#ifdef ALEXNET_HOST_EMULATION
    /* Host tests run every launch with 64-bit indices too (alexnet_host.h). */
    if (alexnet_host::wide_indices)
        return false;
#endif
    unsigned long long threads = (unsigned long long)blockDim.x * gridDim.x;
    return len <= 0x80000000ull && threads <= 0x80000000ull;
}

/* Number of elements of a 4-D tensor, in 64 bits. */
static __device__ __forceinline__ unsigned long long alexnet_numel(const AlexnetTensorShape &s)
{
    return (unsigned long long)s.n * s.c * s.h * s.w;
}

/* Coordinates (n, c, y, x) of element i of an n x c x h x w tensor stored in `layout`. */
template <typename I>
static __device__ __forceinline__ void alexnet_unravel(I i, unsigned int c, unsigned int h,
                                                       unsigned int w, unsigned int layout, I &n_,
                                                       I &c_, I &y_, I &x_)
{
    if (layout == ALEXNET_LAYOUT_NHWC) {
        c_ = i % c;
        i /= c;
        x_ = i % w;
        i /= w;
        y_ = i % h;
        n_ = i / h;
    } else {
        x_ = i % w;
        i /= w;
        y_ = i % h;
        i /= h;
        c_ = i % c;
        n_ = i / c;
    }
}

/* Offset of element (n, c, y, x) of an n x c x h x w tensor stored in `layout`. */
template <typename I>
static __device__ __forceinline__ I alexnet_offset(I n, I c, I y, I x, unsigned int channels,
                                                   unsigned int h, unsigned int w,
                                                   unsigned int layout)
{
    return layout == ALEXNET_LAYOUT_NHWC ? ((n * h + y) * w + x) * channels + c
                                         : ((n * channels + c) * h + y) * w + x;
}

#endif /* ALEXNET_HALF_CUH */
