/*
 * pool.cu — max-pooling over square windows, no padding, floor mode (see AlexnetPoolParams).
 * CPU twin: `cpu::MaxPool2d` (src/cpu/pool.rs); launcher: src/cuda/ops/pool.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

/*
 * One thread per output element; the window is scanned row by row like the CPU's
 * `cpu::MaxPool2d`, with its NaN rule (a NaN anywhere in the window makes the output NaN).
 * The launcher guarantees the windows lie inside the input.
 */
template <typename T, typename I>
static __device__ __forceinline__ void maxpool(const T *__restrict__ src, T *__restrict__ dst,
                                               const AlexnetPoolParams &p, I total)
{
    const AlexnetTensorShape s = p.in;
    ALEXNET_GRID_STRIDE(I, i, total)
    {
        I n, c, oy, ox;
        alexnet_unravel<I>(i, s.c, p.out_h, p.out_w, s.layout, n, c, oy, ox);
        const I y0 = oy * p.stride;
        const I x0 = ox * p.stride;
        float m = __int_as_float(0xff800000); /* -infinity */
        for (unsigned int ky = 0; ky < p.kernel; ++ky) {
            for (unsigned int kx = 0; kx < p.kernel; ++kx) {
                const float v =
                    alexnet_load(src[alexnet_offset<I>(n, c, y0 + ky, x0 + kx, s.c, s.h, s.w,
                                                       s.layout)]);
                if (v > m || alexnet_isnan(v))
                    m = v;
            }
        }
        dst[i] = alexnet_store<T>(m);
    }
}

template <typename T>
static __device__ __forceinline__ void maxpool_dispatch(const T *src, T *dst,
                                                        const AlexnetPoolParams &p)
{
    const unsigned long long in_total = alexnet_numel(p.in);
    const unsigned long long total = (unsigned long long)p.in.n * p.in.c * p.out_h * p.out_w;
    if (alexnet_fits_u32(in_total > total ? in_total : total))
        maxpool<T, unsigned int>(src, dst, p, (unsigned int)total);
    else
        maxpool<T, unsigned long long>(src, dst, p, total);
}

/* Max-pooling on f32 activations. */
extern "C" __global__ void maxpool_f32(const float *src, float *dst, AlexnetPoolParams p)
{
    maxpool_dispatch<float>(src, dst, p);
}

/* Max-pooling on f16 activations (exact: max only selects). */
extern "C" __global__ void maxpool_f16(const unsigned short *src, unsigned short *dst,
                                       AlexnetPoolParams p)
{
    maxpool_dispatch<unsigned short>(src, dst, p);
}
