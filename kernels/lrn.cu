/*
 * lrn.cu — the paper's inter-channel local response normalisation (see AlexnetLrnParams).
 * CPU twin: `cpu::Lrn` (src/cpu/lrn.rs); launcher: src/cuda/ops/lrn.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

/*
 * One thread per element: the sum of squares over the channel window [c - size/2,
 * c + (size-1)/2] (clipped), then a_c / (k + alpha * sum)^beta. Products and sums use
 * __fmul_rn/__fadd_rn (never contracted into FMAs) in the CPU's order (`cpu::Lrn`), and
 * beta = 0.75 takes the CPU's two square roots, so f32 results match the CPU bit for bit.
 */
template <typename T, typename I>
static __device__ __forceinline__ void lrn(const T *__restrict__ src, T *__restrict__ dst,
                                           const AlexnetLrnParams &p, I total)
{
    const AlexnetTensorShape s = p.shape;
    const I plane = (I)s.h * s.w;
    const I channel_stride = s.layout == ALEXNET_LAYOUT_NHWC ? (I)1 : plane;
    const unsigned int before = p.size / 2;
    const unsigned int after = p.size > 0 ? (p.size - 1) / 2 : 0;
    ALEXNET_GRID_STRIDE(I, i, total)
    {
        const unsigned int c =
            (unsigned int)(s.layout == ALEXNET_LAYOUT_NHWC ? i % s.c : (i / plane) % s.c);
        const unsigned int first = c > before ? c - before : 0;
        const unsigned long long last_wide = (unsigned long long)c + after;
        const unsigned int last = last_wide < s.c ? (unsigned int)last_wide : s.c - 1;
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
        const float base = __fadd_rn(p.k, __fmul_rn(p.alpha, sum));
        float out;
        if (p.beta == 0.75f) {
            const float r = sqrtf(base);
            out = a / __fmul_rn(r, sqrtf(r));
        } else {
            out = a / powf(base, p.beta);
        }
        dst[i] = alexnet_store<T>(out);
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
