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

/* The same over bf16 storage. */
extern "C" __global__ void maxpool_bf16(const alexnet_bf16 *src, alexnet_bf16 *dst,
                                        AlexnetPoolParams p)
{
    maxpool_dispatch<alexnet_bf16>(src, dst, p);
}

/* ---- backward (training, f32 and f16: f32 arithmetic, the sum rounded once) ------------- */

/*
 * Whether input (y, x) of plane (n, c), holding `v`, is where window (oy, ox) took its maximum
 * `m` (the forward's output for the window) as the CPU's `unpool_plane` finds it: the first
 * strictly larger value, which is the window's first value equal to m (also when m is
 * -infinity and nothing beat it), or, when m is NaN, the window's last NaN. Only a value that
 * could be it (equal to m, or a NaN) scans the window's earlier (or later) positions; every
 * other value is settled by one comparison.
 */
template <typename T, typename I>
static __device__ __forceinline__ bool maxpool_took(const T *__restrict__ src,
                                                    const AlexnetPoolParams &p, I n, I c, I oy,
                                                    I ox, I y, I x, float v, float m)
{
    const bool nan = alexnet_isnan(m);
    if (nan ? !alexnet_isnan(v) : !(v == m))
        return false;
    const AlexnetTensorShape s = p.in;
    const I y0 = oy * p.stride;
    const I x0 = ox * p.stride;
    /* (y, x)'s place in the window's row-major scan order. */
    const I at = (y - y0) * p.kernel + (x - x0);
    I q = 0;
    for (unsigned int ky = 0; ky < p.kernel; ++ky) {
        for (unsigned int kx = 0; kx < p.kernel; ++kx, ++q) {
            /* NaN: a later NaN would win; otherwise an earlier equal value did. */
            if (!nan && q >= at)
                return true; /* no earlier position holds m */
            if (nan && q <= at)
                continue;
            const float w =
                alexnet_load(src[alexnet_offset<I>(n, c, y0 + ky, x0 + kx, s.c, s.h, s.w, s.layout)]);
            if (nan ? alexnet_isnan(w) : w == m)
                return false;
        }
    }
    return true;
}

/*
 * One thread per input element: the sum of the output gradients of every window whose maximum
 * it is, windows in (oy, ox) order — the order in which the CPU adds them. With relu_first an
 * element that is not positive gets 0 without looking at a window: the ReLU's backward, and
 * after a ReLU about half of the elements.
 */
template <typename T, typename I>
static __device__ __forceinline__ void maxpool_backward(const T *__restrict__ src,
                                                        const T *__restrict__ out,
                                                        const T *__restrict__ grad_out,
                                                        T *__restrict__ grad_in,
                                                        const AlexnetPoolBackwardParams &pb,
                                                        I total)
{
    const AlexnetPoolParams &p = pb.pool;
    const AlexnetTensorShape s = p.in;
    ALEXNET_GRID_STRIDE(I, i, total)
    {
        const float v = alexnet_load(src[i]);
        if (pb.relu_first && !(v > 0.0f)) {
            grad_in[i] = alexnet_store<T>(0.0f);
            continue;
        }
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
                const I o = alexnet_offset<I>(n, c, oy, ox, s.c, p.out_h, p.out_w, s.layout);
                if (maxpool_took<T, I>(src, p, n, c, oy, ox, y, x, v, alexnet_load(out[o])))
                    sum = __fadd_rn(sum, alexnet_load(grad_out[o]));
            }
        }
        grad_in[i] = alexnet_store<T>(sum);
    }
}

template <typename T>
static __device__ __forceinline__ void maxpool_backward_dispatch(const T *src, const T *out,
                                                                 const T *grad_out, T *grad_in,
                                                                 const AlexnetPoolBackwardParams &p)
{
    const unsigned long long total = alexnet_numel(p.pool.in);
    if (alexnet_fits_u32(total))
        maxpool_backward<T, unsigned int>(src, out, grad_out, grad_in, p, (unsigned int)total);
    else
        maxpool_backward<T, unsigned long long>(src, out, grad_out, grad_in, p, total);
}

/*
 * maxpool_backward_f32(const float *src, const float *out, const float *grad_out,
 *                      float *grad_in, AlexnetPoolBackwardParams p): src is the forward's
 * input, out its output, grad_out shaped like out; grad_in like src. No buffer may overlap
 * another.
 */
extern "C" __global__ void maxpool_backward_f32(const float *src, const float *out,
                                                const float *grad_out, float *grad_in,
                                                AlexnetPoolBackwardParams p)
{
    maxpool_backward_dispatch<float>(src, out, grad_out, grad_in, p);
}

/* The same over f16 storage: the f32 sum of the f16 gradients, rounded once to f16. */
extern "C" __global__ void maxpool_backward_f16(const unsigned short *src,
                                                const unsigned short *out,
                                                const unsigned short *grad_out,
                                                unsigned short *grad_in,
                                                AlexnetPoolBackwardParams p)
{
    maxpool_backward_dispatch<unsigned short>(src, out, grad_out, grad_in, p);
}

/* The same over bf16 storage. */
extern "C" __global__ void maxpool_backward_bf16(const alexnet_bf16 *src,
                                                 const alexnet_bf16 *out,
                                                 const alexnet_bf16 *grad_out,
                                                 alexnet_bf16 *grad_in,
                                                 AlexnetPoolBackwardParams p)
{
    maxpool_backward_dispatch<alexnet_bf16>(src, out, grad_out, grad_in, p);
}
