/*
 * softmax.cu — per-row softmax and top-k of the logits (see AlexnetSoftmaxParams).
 * CPU twin: `postprocess::{softmax, top_k}` (src/postprocess.rs); launcher:
 * src/cuda/ops/softmax.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

#define ALEXNET_FULL_WARP 0xffffffffu

/*
 * Block-wide reductions. Every thread of the block must call them (blockDim.x a multiple of 32,
 * at most 1024) and every thread gets the result. `scratch` holds one value per warp.
 */
static __device__ __forceinline__ float alexnet_block_max(float v, float *scratch)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(ALEXNET_FULL_WARP, v, o));
    const unsigned int lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    __syncthreads(); /* the previous reduction's readers are done with scratch */
    if (lane == 0)
        scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : __int_as_float(0xff800000);
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(ALEXNET_FULL_WARP, v, o));
    return v;
}

static __device__ __forceinline__ float alexnet_block_sum(float v, float *scratch)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(ALEXNET_FULL_WARP, v, o);
    const unsigned int lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0)
        scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(ALEXNET_FULL_WARP, v, o);
    return v;
}

static __device__ __forceinline__ unsigned long long
alexnet_block_max_u64(unsigned long long v, unsigned long long *scratch)
{
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(ALEXNET_FULL_WARP, v, o);
        v = other > v ? other : v;
    }
    const unsigned int lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0)
        scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0ull;
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(ALEXNET_FULL_WARP, v, o);
        v = other > v ? other : v;
    }
    return v;
}

/*
 * A probability's rank as an unsigned key: larger key = earlier in `postprocess::top_k`'s order. Every
 * NaN ranks first; other values by the IEEE total order (the sign-magnitude bits made monotone).
 */
static __device__ __forceinline__ unsigned int alexnet_rank_key(float v)
{
    if (alexnet_isnan(v))
        return 0xffffffffu;
    const unsigned int b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* Inverse of alexnet_rank_key (a NaN comes back as the canonical quiet NaN). */
static __device__ __forceinline__ float alexnet_rank_value(unsigned int key)
{
    if (key == 0xffffffffu)
        return __int_as_float(0x7fffffff);
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

/*
 * One block per row (grid-stride over rows). Softmax as the CPU computes it: max (NaN ignored,
 * like f32::max), exp(x - max), divided by the sum. Top-k by k rounds of a block argmax: an
 * entry's 64-bit key is (rank key << 32 | ~index), unique per entry and ordered like
 * `postprocess::top_k` (higher probability first, ties to the lower index), so round r takes the
 * largest key below round r-1's (round 0 the largest: a NaN at index 0 has key ~0). Probabilities are recomputed in each round (the same
 * expression, so the same bits) rather than stored: no shared memory sized by `classes`.
 */
template <typename T>
static __device__ __forceinline__ void softmax_topk(const T *__restrict__ logits,
                                                    float *__restrict__ probs,
                                                    unsigned int *__restrict__ top_class,
                                                    float *__restrict__ top_prob,
                                                    const AlexnetSoftmaxParams &p)
{
    __shared__ float scratch_f[32];
    __shared__ unsigned long long scratch_u[32];
    const unsigned int classes = p.classes;
    for (unsigned int row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const T *x = logits + (unsigned long long)row * classes;

        float m = __int_as_float(0xff800000);
        for (unsigned int j = threadIdx.x; j < classes; j += blockDim.x)
            m = fmaxf(m, alexnet_load(x[j]));
        m = alexnet_block_max(m, scratch_f);

        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < classes; j += blockDim.x)
            s += expf(alexnet_load(x[j]) - m);
        s = alexnet_block_sum(s, scratch_f);

        if (p.write_probs) {
            float *out = probs + (unsigned long long)row * classes;
            for (unsigned int j = threadIdx.x; j < classes; j += blockDim.x)
                out[j] = expf(alexnet_load(x[j]) - m) / s;
        }

        unsigned long long previous = ~0ull;
        for (unsigned int r = 0; r < p.k; ++r) {
            unsigned long long best = 0;
            for (unsigned int j = threadIdx.x; j < classes; j += blockDim.x) {
                const float prob = expf(alexnet_load(x[j]) - m) / s;
                const unsigned long long key =
                    ((unsigned long long)alexnet_rank_key(prob) << 32) | (~j);
                if ((r == 0 || key < previous) && key > best)
                    best = key;
            }
            best = alexnet_block_max_u64(best, scratch_u);
            if (threadIdx.x == 0) {
                const unsigned long long slot = (unsigned long long)row * p.k + r;
                /* Key 0 is no entry's (k > classes: the launcher's error): write a marker. */
                top_class[slot] = best ? ~(unsigned int)best : 0xffffffffu;
                top_prob[slot] = best ? alexnet_rank_value((unsigned int)(best >> 32))
                                      : __int_as_float(0x7fffffff);
            }
            previous = best;
        }
    }
}

/* Softmax + top-k of f32 logits. */
extern "C" __global__ void softmax_topk_f32(const float *logits, float *probs,
                                            unsigned int *top_class, float *top_prob,
                                            AlexnetSoftmaxParams p)
{
    softmax_topk<float>(logits, probs, top_class, top_prob, p);
}

/* Softmax + top-k of f16 logits (f32 arithmetic; probabilities are f32). */
extern "C" __global__ void softmax_topk_f16(const unsigned short *logits, float *probs,
                                            unsigned int *top_class, float *top_prob,
                                            AlexnetSoftmaxParams p)
{
    softmax_topk<unsigned short>(logits, probs, top_class, top_prob, p);
}

/* The same over bf16 storage. */
extern "C" __global__ void softmax_topk_bf16(const alexnet_bf16 *logits, float *probs,
                                             unsigned int *top_class, float *top_prob,
                                             AlexnetSoftmaxParams p)
{
    softmax_topk<alexnet_bf16>(logits, probs, top_class, top_prob, p);
}
