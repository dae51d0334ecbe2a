/*
 * bias_act.cu — bias + optional ReLU in place (one thread per element, grid-stride loop: any grid
 * size is correct), and for training the ReLU's backward and the bias gradient (one block per
 * channel, or where the channel axis is innermost, rows split across blocks). CPU twins:
 * `cpu::bias_act`, `cpu::relu_backward` (src/cpu/bias_act.rs) and the layers' backward bias
 * sums; launcher: src/cuda/ops/bias_act.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"
#include "alexnet_reduce.cuh"

/* x[i] += bias[(i / inner) % channels], then ReLU (NaN kept) if p.relu != 0. In place. */
template <typename T, typename I>
static __device__ __forceinline__ void bias_act(T *__restrict__ x, const T *__restrict__ bias,
                                                const AlexnetBiasActParams &p)
{
    ALEXNET_GRID_STRIDE(I, i, p.len)
    {
        const I outer = p.inner == 1 ? i : i / p.inner;
        float v = alexnet_load(x[i]) + alexnet_load(bias[outer % p.channels]);
        if (p.relu)
            v = alexnet_relu(v);
        x[i] = alexnet_store<T>(v);
    }
}

template <typename T>
static __device__ __forceinline__ void bias_act_dispatch(T *x, const T *bias,
                                                         const AlexnetBiasActParams &p)
{
    if (alexnet_fits_u32(p.len))
        bias_act<T, unsigned int>(x, bias, p);
    else
        bias_act<T, unsigned long long>(x, bias, p);
}

/* Bias + optional ReLU on f32 activations. */
extern "C" __global__ void bias_act_f32(float *x, const float *bias, AlexnetBiasActParams p)
{
    bias_act_dispatch<float>(x, bias, p);
}

/* Bias + optional ReLU on f16 activations (f32 arithmetic, one rounding). */
extern "C" __global__ void bias_act_f16(unsigned short *x, const unsigned short *bias,
                                        AlexnetBiasActParams p)
{
    bias_act_dispatch<unsigned short>(x, bias, p);
}

/* The same over bf16 storage. */
extern "C" __global__ void bias_act_bf16(alexnet_bf16 *x, const alexnet_bf16 *bias,
                                         AlexnetBiasActParams p)
{
    bias_act_dispatch<alexnet_bf16>(x, bias, p);
}

/* ---- ReLU backward (training, f32 and f16) --------------------------------------------- */

/*
 * relu_backward_f32(const float *output, float *grad, AlexnetReluBackwardParams p): in place,
 * grad = output > 0 ? grad : 0 (a NaN output passes nothing, as on the CPU).
 */
template <typename T>
static __device__ __forceinline__ void relu_backward(const T *output, T *grad,
                                                     const AlexnetReluBackwardParams &p)
{
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len)
    {
        if (!(alexnet_load(output[i]) > 0.0f))
            grad[i] = alexnet_store<T>(0.0f);
    }
}

extern "C" __global__ void relu_backward_f32(const float *output, float *grad,
                                             AlexnetReluBackwardParams p)
{
    relu_backward<float>(output, grad, p);
}

/* The same over f16 storage. */
extern "C" __global__ void relu_backward_f16(const unsigned short *output, unsigned short *grad,
                                             AlexnetReluBackwardParams p)
{
    relu_backward<unsigned short>(output, grad, p);
}

/* The same over bf16 storage. */
extern "C" __global__ void relu_backward_bf16(const alexnet_bf16 *output, alexnet_bf16 *grad,
                                              AlexnetReluBackwardParams p)
{
    relu_backward<alexnet_bf16>(output, grad, p);
}

/* ---- Bias gradient (training) ---------------------------------------------------------- */

/* Channel c's gradient: every position of every image, f64 sums per thread, then the block's
 * fixed-order tree (alexnet_reduce.cuh). `scratch` holds blockDim.x doubles of shared memory.
 * A thread visits positions j = threadIdx.x, + blockDim.x, ... as (o, i) pairs (j = o * inner
 * + i) stepped without dividing (a 64-bit division per element cost more than the load),
 * ALEXNET_BIAS_GRAD_PER_THREAD positions an iteration, all loaded before the first is added, so
 * that many loads are in flight: with one block per channel (96 blocks for conv1's 96 on a card
 * of 132 SMs) the loads in flight per block set the bandwidth. Everything runs in a fixed order:
 * the result is the same from run to run. */
template <typename T>
static __device__ __forceinline__ void bias_grad_sum(const T *__restrict__ grad,
                                                     float *__restrict__ out,
                                                     const AlexnetBiasGradParams &p,
                                                     double *scratch)
{
    typedef unsigned long long U;
    enum { LOADS = ALEXNET_BIAS_GRAD_PER_THREAD };
    /* An empty gradient (inner or outer 0) sums nothing; inner is never a divisor of 0. */
    const U inner = p.inner ? p.inner : 1, channels = p.channels;
    const U positions = p.outer * p.inner;
    const U step = blockDim.x;
    const U step_o = step / inner, step_i = step % inner;
    for (unsigned int c = blockIdx.x; c < p.channels; c += gridDim.x) {
        U o = threadIdx.x / inner, i = threadIdx.x % inner, j = threadIdx.x;
        double sums[4] = {0.0, 0.0, 0.0, 0.0};
        while (j < positions) {
            float v[LOADS];
#pragma unroll
            for (int k = 0; k < LOADS; ++k) {
                v[k] = 0.0f;
                if (j < positions) {
                    v[k] = alexnet_load(grad[(o * channels + c) * inner + i]);
                    o += step_o;
                    i += step_i;
                    if (i >= inner) {
                        i -= inner;
                        ++o;
                    }
                    j += step;
                }
            }
#pragma unroll
            for (int k = 0; k < LOADS; ++k)
                sums[k % 4] += (double)v[k];
        }
        double sum = (sums[0] + sums[1]) + (sums[2] + sums[3]);
        sum = alexnet_block_reduce<false>(sum, scratch);
        if (threadIdx.x == 0)
            out[c] = (float)sum;
    }
}

/* The bias gradient of f32 gradients. */
extern "C" __global__ void __launch_bounds__(ALEXNET_BIAS_GRAD_BLOCK)
bias_grad_f32(const float *grad, float *bias_grad, AlexnetBiasGradParams p)
{
    __shared__ double scratch[ALEXNET_BIAS_GRAD_BLOCK];
    bias_grad_sum<float>(grad, bias_grad, p, scratch);
}

/* The bias gradient of f16 gradients (mixed precision), summed in f64 into f32. */
extern "C" __global__ void __launch_bounds__(ALEXNET_BIAS_GRAD_BLOCK)
bias_grad_f16(const unsigned short *grad, float *bias_grad, AlexnetBiasGradParams p)
{
    __shared__ double scratch[ALEXNET_BIAS_GRAD_BLOCK];
    bias_grad_sum<unsigned short>(grad, bias_grad, p, scratch);
}

/* The same over bf16 gradients. */
extern "C" __global__ void __launch_bounds__(ALEXNET_BIAS_GRAD_BLOCK)
bias_grad_bf16(const alexnet_bf16 *grad, float *bias_grad, AlexnetBiasGradParams p)
{
    __shared__ double scratch[ALEXNET_BIAS_GRAD_BLOCK];
    bias_grad_sum<alexnet_bf16>(grad, bias_grad, p, scratch);
}

/* ---- Bias gradient, channel axis innermost (NHWC, linear rows) ---------------------------- */

/* One work item (a split of the rows, a tile of ALEXNET_BIAS_COLUMNS_TILE channels) per block
 * at a time: lane l of every warp sums channel tile * TILE + l over the rows the warp visits
 * (warp w: rows start + w, start + w + warps, ...), ALEXNET_BIAS_GRAD_PER_THREAD loads in
 * flight, in f64; then warp 0 adds the warps' sums in warp order. `scratch` holds blockDim.x
 * doubles of shared memory. */
template <typename T>
static __device__ __forceinline__ void bias_grad_columns(const T *__restrict__ grad,
                                                         double *__restrict__ partials,
                                                         const AlexnetBiasColumnsParams &p,
                                                         double *scratch)
{
    typedef unsigned long long U;
    enum { LOADS = ALEXNET_BIAS_GRAD_PER_THREAD, TILE = ALEXNET_BIAS_COLUMNS_TILE };
    const unsigned int lane = threadIdx.x % TILE, warp = threadIdx.x / TILE;
    const unsigned int warps = blockDim.x / TILE;
    const U channels = p.channels;
    const U tiles = (channels + TILE - 1) / TILE;
    const U items = tiles * p.splits;
    for (U item = blockIdx.x; item < items; item += gridDim.x) {
        const U split = item / tiles;
        const U c = (item % tiles) * TILE + lane;
        const U start = split * p.rows_per_split;
        /* Written without start + rows_per_split overflowing; a split past the rows is empty. */
        const U end = start >= p.rows                     ? start
                      : p.rows - start < p.rows_per_split ? p.rows
                                                          : start + p.rows_per_split;
        double sums[4] = {0.0, 0.0, 0.0, 0.0};
        if (c < channels && warp < warps) {
            U r = start + warp;
            while (r < end) {
                float v[LOADS];
#pragma unroll
                for (int k = 0; k < LOADS; ++k) {
                    v[k] = 0.0f;
                    if (r < end) {
                        v[k] = alexnet_load(grad[r * channels + c]);
                        r += warps;
                    }
                }
#pragma unroll
                for (int k = 0; k < LOADS; ++k)
                    sums[k % 4] += (double)v[k];
            }
        }
        scratch[threadIdx.x] = (sums[0] + sums[1]) + (sums[2] + sums[3]);
        __syncthreads();
        if (warp == 0 && c < channels) {
            double sum = 0.0;
            for (unsigned int w = 0; w < warps; ++w)
                sum += scratch[w * TILE + lane];
            partials[split * channels + c] = sum;
        }
        /* The next item's sums overwrite `scratch` only after warp 0 has read it. */
        __syncthreads();
    }
}

/* The partial sums of f32 gradients. */
extern "C" __global__ void __launch_bounds__(ALEXNET_BIAS_COLUMNS_BLOCK)
bias_grad_columns_f32(const float *grad, double *partials, AlexnetBiasColumnsParams p)
{
    __shared__ double scratch[ALEXNET_BIAS_COLUMNS_BLOCK];
    bias_grad_columns<float>(grad, partials, p, scratch);
}

/* The partial sums of f16 gradients (mixed precision). */
extern "C" __global__ void __launch_bounds__(ALEXNET_BIAS_COLUMNS_BLOCK)
bias_grad_columns_f16(const unsigned short *grad, double *partials, AlexnetBiasColumnsParams p)
{
    __shared__ double scratch[ALEXNET_BIAS_COLUMNS_BLOCK];
    bias_grad_columns<unsigned short>(grad, partials, p, scratch);
}

/* The same over bf16 gradients. */
extern "C" __global__ void __launch_bounds__(ALEXNET_BIAS_COLUMNS_BLOCK)
bias_grad_columns_bf16(const alexnet_bf16 *grad, double *partials, AlexnetBiasColumnsParams p)
{
    __shared__ double scratch[ALEXNET_BIAS_COLUMNS_BLOCK];
    bias_grad_columns<alexnet_bf16>(grad, partials, p, scratch);
}

/* Each channel's partial sums, added in split order, written as the f32 bias gradient. */
extern "C" __global__ void bias_grad_finish_f32(const double *partials, float *bias_grad,
                                                AlexnetBiasColumnsParams p)
{
    ALEXNET_GRID_STRIDE(unsigned long long, c, p.channels)
    {
        double sum = 0.0;
        for (unsigned long long s = 0; s < p.splits; ++s)
            sum += partials[s * p.channels + c];
        bias_grad[c] = (float)sum;
    }
}
