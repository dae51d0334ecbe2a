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

/* ---- backward (training, f32 and f16: f32 arithmetic on the widened values) ------------- */

/* D_c = k + alpha * (the window's sum of squares), as the CPU's backward computes it. */
template <typename T, typename I>
static __device__ __forceinline__ float lrn_denominator(const T *channel0, I channel_stride,
                                                        unsigned int c, const AlexnetLrnParams &p)
{
    unsigned int first, last;
    alexnet_lrn_window(c, p, first, last);
    float sum = 0.0f;
    for (unsigned int j = first; j <= last; ++j) {
        const float a = alexnet_load(channel0[(I)j * channel_stride]);
        sum = __fadd_rn(sum, __fmul_rn(a, a));
    }
    return __fadd_rn(p.k, __fmul_rn(p.alpha, sum));
}

/* D^-beta: the CPU's two square roots for beta = 0.75, powf otherwise. */
static __device__ __forceinline__ float lrn_inverse_power(float d, float beta)
{
    if (beta == 0.75f) {
        const float r = sqrtf(d);
        return 1.0f / __fmul_rn(r, sqrtf(r));
    }
    return powf(d, -beta);
}

/*
 * One thread per element i: da_i = g_i D_i^-beta - 2 alpha beta a_i sum_c t_c over the channels
 * c whose window holds i, t_c = g_c a_c D_c^-beta / D_c, in the CPU's order and rounding.
 */
template <typename T, typename I>
static __device__ __forceinline__ void lrn_backward(const T *__restrict__ src,
                                                    const T *__restrict__ grad_out,
                                                    T *__restrict__ grad_in,
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
        const I base = i - (I)c * channel_stride; /* element i's position in channel 0 */
        const T *a0 = src + base;
        const T *g0 = grad_out + base;
        /* The channels whose window holds c: [c - after, c + before], clipped. */
        const unsigned int first = c > after ? c - after : 0;
        const unsigned long long last_wide = (unsigned long long)c + before;
        const unsigned int last = last_wide < s.c ? (unsigned int)last_wide : s.c - 1;
        float sum = 0.0f;
        for (unsigned int ch = first; ch <= last; ++ch) {
            const float d = lrn_denominator<T, I>(a0, channel_stride, ch, p);
            const float scale = lrn_inverse_power(d, p.beta);
            const I at = (I)ch * channel_stride;
            const float t =
                __fmul_rn(__fmul_rn(alexnet_load(g0[at]), alexnet_load(a0[at])), scale) / d;
            sum = __fadd_rn(sum, t);
        }
        const float scale =
            lrn_inverse_power(lrn_denominator<T, I>(a0, channel_stride, c, p), p.beta);
        const float coefficient =
            __fmul_rn(__fmul_rn(__fmul_rn(2.0f, p.alpha), p.beta), alexnet_load(src[i]));
        grad_in[i] = alexnet_store<T>(
            __fadd_rn(__fmul_rn(alexnet_load(grad_out[i]), scale), -__fmul_rn(coefficient, sum)));
    }
}

template <typename T>
static __device__ __forceinline__ void lrn_backward_dispatch(const T *src, const T *grad_out,
                                                             T *grad_in, const AlexnetLrnParams &p)
{
    const unsigned long long total = alexnet_numel(p.shape);
    if (alexnet_fits_u32(total))
        lrn_backward<T, unsigned int>(src, grad_out, grad_in, p, (unsigned int)total);
    else
        lrn_backward<T, unsigned long long>(src, grad_out, grad_in, p, total);
}

/*
 * lrn_backward_f32(const float *src, const float *grad_out, float *grad_in, AlexnetLrnParams p):
 * src is the LRN's input (p.relu_first must be 0: the ReLU's backward is its own kernel),
 * grad_out and grad_in are shaped like it. No buffer may overlap another.
 */
extern "C" __global__ void lrn_backward_f32(const float *src, const float *grad_out,
                                            float *grad_in, AlexnetLrnParams p)
{
    lrn_backward_dispatch<float>(src, grad_out, grad_in, p);
}

/* The same over f16 storage: f32 arithmetic on the widened values, each result rounded once. */
extern "C" __global__ void lrn_backward_f16(const unsigned short *src,
                                            const unsigned short *grad_out,
                                            unsigned short *grad_in, AlexnetLrnParams p)
{
    lrn_backward_dispatch<unsigned short>(src, grad_out, grad_in, p);
}
