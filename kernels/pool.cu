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

/* ---- backward (training, f32 and f16: f32 arithmetic, the sum rounded once) ------------- */

/*
 * Where window (oy, ox) of plane (n, c) took its maximum, as the CPU's `unpool_plane` finds it:
 * the first strictly larger value, or the last NaN; the window's first element if nothing beat
 * -infinity.
 */
template <typename T, typename I>
static __device__ __forceinline__ void maxpool_argmax(const T *__restrict__ src,
                                                      const AlexnetPoolParams &p, I n, I c, I oy,
                                                      I ox, I &at_y, I &at_x)
{
    const AlexnetTensorShape s = p.in;
    const I y0 = oy * p.stride;
    const I x0 = ox * p.stride;
    float best = __int_as_float(0xff800000); /* -infinity */
    at_y = y0;
    at_x = x0;
    for (unsigned int ky = 0; ky < p.kernel; ++ky) {
        for (unsigned int kx = 0; kx < p.kernel; ++kx) {
            const float v =
                alexnet_load(src[alexnet_offset<I>(n, c, y0 + ky, x0 + kx, s.c, s.h, s.w, s.layout)]);
            if (v > best || alexnet_isnan(v)) {
                best = v;
                at_y = y0 + ky;
                at_x = x0 + kx;
            }
        }
    }
}

/*
 * One thread per input element: the sum of the output gradients of every window whose maximum
 * it is, windows in (oy, ox) order — the order in which the CPU adds them.
 */
template <typename T, typename I>
static __device__ __forceinline__ void maxpool_backward(const T *__restrict__ src,
                                                        const T *__restrict__ grad_out,
                                                        T *__restrict__ grad_in,
                                                        const AlexnetPoolParams &p, I total)
{
    const AlexnetTensorShape s = p.in;
    ALEXNET_GRID_STRIDE(I, i, total)
    {
        I n, c, y, x;
        alexnet_unravel<I>(i, s.c, s.h, s.w, s.layout, n, c, y, x);
        /* The windows holding row y: oy * stride <= y < oy * stride + kernel, oy < out_h. */
        const I k = p.kernel, st = p.stride;
        const I oy_first = y + 1 > k ? (y + 1 - k + st - 1) / st : 0;
        const I oy_last_wide = y / st;
        const I oy_last = oy_last_wide < (I)p.out_h ? oy_last_wide : (I)p.out_h - 1;
        const I ox_first = x + 1 > k ? (x + 1 - k + st - 1) / st : 0;
        const I ox_last_wide = x / st;
        const I ox_last = ox_last_wide < (I)p.out_w ? ox_last_wide : (I)p.out_w - 1;
        float sum = 0.0f;
        for (I oy = oy_first; oy <= oy_last && p.out_h > 0; ++oy) {
            for (I ox = ox_first; ox <= ox_last && p.out_w > 0; ++ox) {
                I at_y, at_x;
                maxpool_argmax<T, I>(src, p, n, c, oy, ox, at_y, at_x);
                if (at_y == y && at_x == x)
                    sum = __fadd_rn(sum, alexnet_load(grad_out[alexnet_offset<I>(
                                             n, c, oy, ox, s.c, p.out_h, p.out_w, s.layout)]));
            }
        }
        grad_in[i] = alexnet_store<T>(sum);
    }
}

template <typename T>
static __device__ __forceinline__ void maxpool_backward_dispatch(const T *src, const T *grad_out,
                                                                 T *grad_in,
                                                                 const AlexnetPoolParams &p)
{
    const unsigned long long total = alexnet_numel(p.in);
    if (alexnet_fits_u32(total))
        maxpool_backward<T, unsigned int>(src, grad_out, grad_in, p, (unsigned int)total);
    else
        maxpool_backward<T, unsigned long long>(src, grad_out, grad_in, p, total);
}

/*
 * maxpool_backward_f32(const float *src, const float *grad_out, float *grad_in,
 *                      AlexnetPoolParams p): src is the forward's input, grad_out shaped like
 * its output; grad_in like src. No buffer may overlap another.
 */
extern "C" __global__ void maxpool_backward_f32(const float *src, const float *grad_out,
                                                float *grad_in, AlexnetPoolParams p)
{
    maxpool_backward_dispatch<float>(src, grad_out, grad_in, p);
}

/* The same over f16 storage: the f32 sum of the f16 gradients, rounded once to f16. */
extern "C" __global__ void maxpool_backward_f16(const unsigned short *src,
                                                const unsigned short *grad_out,
                                                unsigned short *grad_in, AlexnetPoolParams p)
{
    maxpool_backward_dispatch<unsigned short>(src, grad_out, grad_in, p);
}
