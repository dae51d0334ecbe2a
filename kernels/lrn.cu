/*
 * lrn.cu — the paper's inter-channel local response normalisation (see AlexnetLrnParams).
 * CPU twin: `cpu::Lrn` (src/cpu/lrn.rs); launcher: src/cuda/ops/lrn.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"
#include "alexnet_lrn.cuh"

/*
 * One thread per element: the sum of squares over the channel window, then a_c / (k + alpha *
 * sum)^beta (alexnet_lrn.cuh: the CPU's order and rounding, bit for bit in f32).
 */
template <typename T, typename I>
static __device__ __forceinline__ void lrn(const T *__restrict__ src, T *__restrict__ dst,
                                           const AlexnetLrnParams &p, I total)
{
    const AlexnetTensorShape s = p.shape;
    const I plane = (I)s.h * s.w;
    const I channel_stride = s.layout == ALEXNET_LAYOUT_NHWC ? (I)1 : plane;
    ALEXNET_GRID_STRIDE(I, i, total)
    {
        const unsigned int c =
            (unsigned int)(s.layout == ALEXNET_LAYOUT_NHWC ? i % s.c : (i / plane) % s.c);
        unsigned int first, last;
        alexnet_lrn_window(c, p, first, last);
        const T *channel0 = src + (i - (I)c * channel_stride);
        float sum = 0.0f;
        for (unsigned int j = first; j <= last; ++j) {
            float a = alexnet_load(channel0[(I)j * channel_stride]);
            if (p.relu_first)
                a = alexnet_relu(a);
            sum = __fadd_rn(sum, __fmul_rn(a, a));
        }
        float a = alexnet_load(src[i]);
        if (p.relu_first)
            a = alexnet_relu(a);
        dst[i] = alexnet_store<T>(alexnet_lrn_value(a, sum, p));
    }
}

template <typename T>
static __device__ __forceinline__ void lrn_dispatch(const T *src, T *dst, const AlexnetLrnParams &p)
{
    const unsigned long long total = alexnet_numel(p.shape);
    if (alexnet_fits_u32(total))
        lrn<T, unsigned int>(src, dst, p, (unsigned int)total);
    else
        lrn<T, unsigned long long>(src, dst, p, total);
}

/* LRN on f32 activations. */
extern "C" __global__ void lrn_f32(const float *src, float *dst, AlexnetLrnParams p)
{
    lrn_dispatch<float>(src, dst, p);
}

/* LRN on f16 activations (f32 arithmetic, one rounding of the result). */
extern "C" __global__ void lrn_f16(const unsigned short *src, unsigned short *dst,
                                   AlexnetLrnParams p)
{
    lrn_dispatch<unsigned short>(src, dst, p);
}
