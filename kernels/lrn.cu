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

/* The same over bf16 storage. */
extern "C" __global__ void lrn_bf16(const alexnet_bf16 *src, alexnet_bf16 *dst,
                                    AlexnetLrnParams p)
{
    lrn_dispatch<alexnet_bf16>(src, dst, p);
}

/* ---- backward (training, f32 and f16: f32 arithmetic on the widened values) ------------- */

/* The LRN's input a at `x`: max(x, 0) when the ReLU before it is fused in (relu_first). */
template <typename T>
static __device__ __forceinline__ float lrn_input(const T *x, const AlexnetLrnParams &p)
{
    const float a = alexnet_load(*x);
    return p.relu_first ? alexnet_relu(a) : a;
}

/* D_c = k + alpha * (the window's sum of squares), as the CPU's backward computes it. */
template <typename T, typename I>
static __device__ __forceinline__ float lrn_denominator(const T *channel0, I channel_stride,
                                                        unsigned int c, const AlexnetLrnParams &p)
{
    unsigned int first, last;
    alexnet_lrn_window(c, p, first, last);
    float sum = 0.0f;
    for (unsigned int j = first; j <= last; ++j) {
        const float a = lrn_input(channel0 + (I)j * channel_stride, p);
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

/* da_c's first term: g_c D_c^-beta. */
static __device__ __forceinline__ float lrn_scaled_gradient(float g, float scale)
{
    return __fmul_rn(g, scale);
}

/* t_c = g_c a_c D_c^-beta / D_c, the term channel c adds to the gradient of its window. */
static __device__ __forceinline__ float lrn_window_term(float g, float a, float scale, float d)
{
    return __fmul_rn(__fmul_rn(g, a), scale) / d;
}

/* da_i = g_i D_i^-beta - 2 alpha beta a_i (sum of the window's terms), rounded once; with the
 * ReLU before the LRN fused in (relu_first), its backward too: 0 where a_i = max(x_i, 0) is not
 * positive (a NaN input passes nothing), as `cpu::relu_backward` on the ReLU's output. */
static __device__ __forceinline__ float lrn_input_gradient(float scaled, float a, float sum,
                                                           const AlexnetLrnParams &p)
{
    if (p.relu_first && !(a > 0.0f))
        return 0.0f;
    const float coefficient = __fmul_rn(__fmul_rn(__fmul_rn(2.0f, p.alpha), p.beta), a);
    return __fadd_rn(scaled, -__fmul_rn(coefficient, sum));
}

/*
 * One thread per element i: da_i = g_i D_i^-beta - 2 alpha beta a_i sum_c t_c over the channels
 * c whose window holds i, t_c = g_c a_c D_c^-beta / D_c, in the CPU's order and rounding. Each
 * thread recomputes D for every channel of i's window (size + 1 of them): the path for windows
 * wider than the ring below.
 */
template <typename T, typename I>
static __device__ __forceinline__ void lrn_backward_per_element(const T *__restrict__ src,
                                                                const T *__restrict__ grad_out,
                                                                T *__restrict__ grad_in,
                                                                const AlexnetLrnParams &p,
                                                                I total)
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
            const I at = (I)ch * channel_stride;
            sum = __fadd_rn(sum, lrn_window_term(alexnet_load(g0[at]), lrn_input(a0 + at, p),
                                                 lrn_inverse_power(d, p.beta), d));
        }
        const float scale =
            lrn_inverse_power(lrn_denominator<T, I>(a0, channel_stride, c, p), p.beta);
        grad_in[i] = alexnet_store<T>(lrn_input_gradient(
            lrn_scaled_gradient(alexnet_load(grad_out[i]), scale), lrn_input(src + i, p), sum, p));
    }
}

/*
 * One thread per pixel and run of ALEXNET_LRN_BACKWARD_CHUNK channels [c0, c1): the channels'
 * D, D^-beta and t computed once each, in channel order, into a window of the last
 * ALEXNET_LRN_BACKWARD_RING channels (at least `size`: every term of a window and g_c D_c^-beta
 * are still there when channel c finishes, `before` channels later). The same operations in the
 * same order as the per-element path, so the same bits; the per-element path computes every D
 * size + 1 times, and each costs two square roots and two divisions. a0, g0 and d0 point at
 * channel 0 of the pixel.
 *
 * The window is a shift register, channel ch - m at [RING - 1 - m], read and written only at
 * constant indices once the loops over it unroll: indexed by channel (ch % RING) it lived in
 * local memory, a 128-byte stack frame per thread and ~8 local loads and stores per channel
 * beside the denominator's loads (ptxas -v, sm_90: now no frame, 56 registers against 32; the
 * shifts are register moves). Not yet timed on a GPU against the local-memory ring.
 */
template <typename T, typename I>
static __device__ __forceinline__ void lrn_backward_channels(const T *__restrict__ a0,
                                                             const T *__restrict__ g0,
                                                             T *__restrict__ d0, I channel_stride,
                                                             unsigned int c0, unsigned int c1,
                                                             const AlexnetLrnParams &p)
{
    typedef unsigned long long U;
    /* size <= RING, so before = size / 2 <= RING / 2: g D^-beta is needed that far back. */
    enum { RING = ALEXNET_LRN_BACKWARD_RING, SCALED = RING / 2 + 1 };
    const U channels = p.shape.c;
    const U before = p.size / 2;
    const U after = p.size > 0 ? (p.size - 1) / 2 : 0;
    float terms[RING];    /* t of channel ch - m at [RING - 1 - m] */
    float scaled[SCALED]; /* g D^-beta of channel ch - m at [SCALED - 1 - m] */
#pragma unroll
    for (int k = 0; k < RING; ++k)
        terms[k] = 0.0f;
#pragma unroll
    for (int k = 0; k < SCALED; ++k)
        scaled[k] = 0.0f;
    /* From the first channel whose term reaches c0 to the step at which c1 - 1 finishes. */
    const U first = c0 > after ? c0 - after : 0;
    const U end = (U)c1 - 1 + before;
    for (U ch = first; ch <= end; ++ch) {
#pragma unroll
        for (int k = 0; k < RING - 1; ++k)
            terms[k] = terms[k + 1];
#pragma unroll
        for (int k = 0; k < SCALED - 1; ++k)
            scaled[k] = scaled[k + 1];
        /* Past the last channel nothing enters (windows stop at it: never read). */
        terms[RING - 1] = 0.0f;
        scaled[SCALED - 1] = 0.0f;
        if (ch < channels) {
            const I at = (I)ch * channel_stride;
            const float d = lrn_denominator<T, I>(a0, channel_stride, (unsigned int)ch, p);
            const float scale = lrn_inverse_power(d, p.beta);
            const float g = alexnet_load(g0[at]);
            terms[RING - 1] = lrn_window_term(g, lrn_input(a0 + at, p), scale, d);
            scaled[SCALED - 1] = lrn_scaled_gradient(g, scale);
        }
        /* Channel c = ch - before has every term of its window [c - after, c + before]. */
        if (ch < (U)c0 + before)
            continue;
        const U c = ch - before;
        const U low = c > after ? c - after : 0;
        const U high = ch < channels ? ch : channels - 1;
        /* Channels low..high, in that order, sit at terms[from..=to]; c at
         * scaled[SCALED - 1 - before]. */
        const int from = RING - 1 - (int)(ch - low);
        const int to = RING - 1 - (int)(ch - high);
        const int scaled_at = SCALED - 1 - (int)before;
        float sum = 0.0f;
        float scaled_c = 0.0f;
#pragma unroll
        for (int k = 0; k < RING; ++k)
            if (k >= from && k <= to)
                sum = __fadd_rn(sum, terms[k]);
#pragma unroll
        for (int k = 0; k < SCALED; ++k)
            if (k == scaled_at)
                scaled_c = scaled[k];
        const I at = (I)c * channel_stride;
        d0[at] = alexnet_store<T>(lrn_input_gradient(scaled_c, lrn_input(a0 + at, p), sum, p));
    }
}

/* The ring path over every (chunk, pixel) pair; consecutive threads take consecutive pixels. */
template <typename T, typename I>
static __device__ __forceinline__ void lrn_backward_by_pixel(const T *__restrict__ src,
                                                             const T *__restrict__ grad_out,
                                                             T *__restrict__ grad_in,
                                                             const AlexnetLrnParams &p)
{
    enum { CHUNK = ALEXNET_LRN_BACKWARD_CHUNK };
    const AlexnetTensorShape s = p.shape;
    const bool nhwc = s.layout == ALEXNET_LAYOUT_NHWC;
    const I plane = (I)s.h * s.w;
    const I pixels = (I)s.n * plane;
    const I channel_stride = nhwc ? (I)1 : plane;
    const unsigned int chunks = s.c / CHUNK + (s.c % CHUNK != 0);
    ALEXNET_GRID_STRIDE(I, item, pixels * chunks)
    {
        const I pixel = item % pixels;
        const unsigned int c0 = (unsigned int)(item / pixels) * CHUNK;
        const unsigned int c1 = s.c - c0 < CHUNK ? s.c : c0 + CHUNK;
        const I base = nhwc ? pixel * s.c : (pixel / plane) * s.c * plane + pixel % plane;
        lrn_backward_channels<T, I>(src + base, grad_out + base, grad_in + base, channel_stride,
                                    c0, c1, p);
    }
}

template <typename T>
static __device__ __forceinline__ void lrn_backward_dispatch(const T *src, const T *grad_out,
                                                             T *grad_in, const AlexnetLrnParams &p)
{
    /* The ring path's (chunk, pixel) items never outnumber the elements. */
    const unsigned long long total = alexnet_numel(p.shape);
    const bool ring = p.size <= ALEXNET_LRN_BACKWARD_RING;
    if (alexnet_fits_u32(total)) {
        if (ring)
            lrn_backward_by_pixel<T, unsigned int>(src, grad_out, grad_in, p);
        else
            lrn_backward_per_element<T, unsigned int>(src, grad_out, grad_in, p,
                                                      (unsigned int)total);
    } else {
        if (ring)
            lrn_backward_by_pixel<T, unsigned long long>(src, grad_out, grad_in, p);
        else
            lrn_backward_per_element<T, unsigned long long>(src, grad_out, grad_in, p, total);
    }
}

/*
 * lrn_backward_f32(const float *src, const float *grad_out, float *grad_in, AlexnetLrnParams p):
 * src is the LRN's input (with p.relu_first, the fused ReLU's input, whose backward is then
 * applied too), grad_out and grad_in are shaped like it. No buffer may overlap another.
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

/* The same over bf16 storage. */
extern "C" __global__ void lrn_backward_bf16(const alexnet_bf16 *src,
                                             const alexnet_bf16 *grad_out,
                                             alexnet_bf16 *grad_in, AlexnetLrnParams p)
{
    lrn_backward_dispatch<alexnet_bf16>(src, grad_out, grad_in, p);
}
