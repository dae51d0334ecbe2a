/*
 * prepare.cu — the network's input tensor from what a caller holds: u8 HWC images, normalised
 * (see AlexnetPrepareParams; CPU twin `U8Batch::to_nchw_f32`, src/image/batch.rs, normalising
 * like `Preprocess::normalize_into`), or an already normalised f32 NCHW batch, reordered and
 * padded (see AlexnetRelayoutParams; CPU twin `cuda::tensor::to_physical` of the zero-padded
 * batch). Launchers: src/cuda/ops/prepare.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

/*
 * One thread per output element: (x / 255 - mean[c]) / std[c] for c < 3, 0 for the padding
 * channels. The expression and its order of operations are the CPU's (`image::preprocess::normalize_hwc`),
 * and none of it can be contracted into an FMA, so f32 results are bit-identical to the CPU's.
 */
template <typename T, typename I>
static __device__ __forceinline__ void prepare_input(const unsigned char *__restrict__ src,
                                                     T *__restrict__ dst,
                                                     const AlexnetPrepareParams &p, I total)
{
    const AlexnetTensorShape s = p.out;
    ALEXNET_GRID_STRIDE(I, i, total)
    {
        I n, c, y, x;
        alexnet_unravel<I>(i, s.c, s.h, s.w, s.layout, n, c, y, x);
        float v = 0.0f;
        if (c < 3) {
            const unsigned char byte = src[((n * s.h + y) * s.w + x) * 3 + c];
            /* Picked at constant indices: p.mean[c] copied the parameters to local memory
             * (a 48-byte stack frame per thread, ptxas -v on sm_90). */
            const float mean = c == 0 ? p.mean[0] : c == 1 ? p.mean[1] : p.mean[2];
            const float std = c == 0 ? p.std[0] : c == 1 ? p.std[1] : p.std[2];
            v = ((float)byte / 255.0f - mean) / std;
        }
        dst[i] = alexnet_store<T>(v);
    }
}

template <typename T>
static __device__ __forceinline__ void prepare_input_dispatch(const unsigned char *src, T *dst,
                                                              const AlexnetPrepareParams &p)
{
    const unsigned long long total = alexnet_numel(p.out);
    if (alexnet_fits_u32(total))
        prepare_input<T, unsigned int>(src, dst, p, (unsigned int)total);
    else
        prepare_input<T, unsigned long long>(src, dst, p, total);
}

/* Normalised f32 input. */
extern "C" __global__ void prepare_input_f32(const unsigned char *src, float *dst,
                                             AlexnetPrepareParams p)
{
    prepare_input_dispatch<float>(src, dst, p);
}

/* Normalised input rounded to f16. */
extern "C" __global__ void prepare_input_f16(const unsigned char *src, unsigned short *dst,
                                             AlexnetPrepareParams p)
{
    prepare_input_dispatch<unsigned short>(src, dst, p);
}

/* The same over bf16 storage. */
extern "C" __global__ void prepare_input_bf16(const unsigned char *src, alexnet_bf16 *dst,
                                              AlexnetPrepareParams p)
{
    prepare_input_dispatch<alexnet_bf16>(src, dst, p);
}

/*
 * One thread per output element: the f32 NCHW source's value at (n, c, y, x) for c below the
 * source's channels, 0 for the padding channels; one rounding to T, no arithmetic.
 */
template <typename T, typename I>
static __device__ __forceinline__ void relayout_f32(const float *__restrict__ src,
                                                    T *__restrict__ dst,
                                                    const AlexnetRelayoutParams &p, I total)
{
    const AlexnetTensorShape s = p.out;
    ALEXNET_GRID_STRIDE(I, i, total)
    {
        I n, c, y, x;
        alexnet_unravel<I>(i, s.c, s.h, s.w, s.layout, n, c, y, x);
        float v = 0.0f;
        if (c < (I)p.src_channels)
            v = src[((n * p.src_channels + c) * s.h + y) * s.w + x];
        dst[i] = alexnet_store<T>(v);
    }
}

template <typename T>
static __device__ __forceinline__ void relayout_f32_dispatch(const float *src, T *dst,
                                                             const AlexnetRelayoutParams &p)
{
    const unsigned long long total = alexnet_numel(p.out);
    if (alexnet_fits_u32(total))
        relayout_f32<T, unsigned int>(src, dst, p, (unsigned int)total);
    else
        relayout_f32<T, unsigned long long>(src, dst, p, total);
}

/* An f32 NCHW batch into an f32 tensor of the output's layout and channels. */
extern "C" __global__ void relayout_f32_to_f32(const float *src, float *dst,
                                               AlexnetRelayoutParams p)
{
    relayout_f32_dispatch<float>(src, dst, p);
}

/* An f32 NCHW batch into an f16 tensor of the output's layout and channels (e.g. the fp16
 * network's 8-channel NHWC input). */
extern "C" __global__ void relayout_f32_to_f16(const float *src, unsigned short *dst,
                                               AlexnetRelayoutParams p)
{
    relayout_f32_dispatch<unsigned short>(src, dst, p);
}

/* The same over bf16 storage. */
extern "C" __global__ void relayout_f32_to_bf16(const float *src, alexnet_bf16 *dst,
                                                AlexnetRelayoutParams p)
{
    relayout_f32_dispatch<alexnet_bf16>(src, dst, p);
}
