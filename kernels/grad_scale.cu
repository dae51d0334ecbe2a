/*
 * grad_scale.cu — mixed precision's gradient unscaling with the overflow check (see
 * AlexnetGradUnscaleParams), one thread per element, grid-stride loop. CPU twin:
 * `train::unscale_gradients` (src/train/loss_scale.rs); launcher: src/cuda/ops/grad_scale.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

template <typename T>
static __device__ __forceinline__ void grad_unscale(const T *src, float *dst,
                                                    unsigned int *found_nonfinite,
                                                    const AlexnetStepSettings *settings,
                                                    const AlexnetGradUnscaleParams &p)
{
    const float inv_scale = settings != 0 ? settings->inv_loss_scale : p.inv_scale;
    bool nonfinite = false;
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len)
    {
        const float unscaled = __fmul_rn(alexnet_load(src[i]), inv_scale);
        /* Infinite or NaN (every exponent bit set), checked after the product: an infinite or
         * NaN gradient stays so, and a scale backed off below 1 (inv_scale > 1) can take a
         * large finite one past f32's range. */
        nonfinite |= (__float_as_uint(unscaled) & 0x7f800000u) == 0x7f800000u;
        dst[i] = unscaled;
    }
    /* One atomic per thread that saw an overflow, not per element. */
    if (nonfinite)
        atomicOr(found_nonfinite, 1u);
}

/* f32 gradients (src may be dst). */
extern "C" __global__ void grad_unscale_f32(const float *src, float *dst,
                                            unsigned int *found_nonfinite,
                                            const AlexnetStepSettings *settings,
                                            AlexnetGradUnscaleParams p)
{
    grad_unscale<float>(src, dst, found_nonfinite, settings, p);
}

/* f16 gradients widened into the f32 master gradients. */
extern "C" __global__ void grad_unscale_f16(const unsigned short *src, float *dst,
                                            unsigned int *found_nonfinite,
                                            const AlexnetStepSettings *settings,
                                            AlexnetGradUnscaleParams p)
{
    grad_unscale<unsigned short>(src, dst, found_nonfinite, settings, p);
}

/* The same over bf16 storage. */
extern "C" __global__ void grad_unscale_bf16(const alexnet_bf16 *src, float *dst,
                                             unsigned int *found_nonfinite,
                                             const AlexnetStepSettings *settings,
                                             AlexnetGradUnscaleParams p)
{
    grad_unscale<alexnet_bf16>(src, dst, found_nonfinite, settings, p);
}
