/*
 * dropout.cu — training-mode dropout in place with the CPU's counter-based mask, one thread per
 * element, grid-stride loop. CPU twin: `cpu::Dropout` (src/cpu/dropout.rs); launcher:
 * src/cuda/ops/dropout.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

/*
 * The CPU's `cpu::keep_draw` (splitmix64's finaliser over seed * golden + index + golden),
 * bit for bit, so both backends draw the same mask from a seed.
 */
static __device__ __forceinline__ unsigned int alexnet_keep_draw(unsigned long long seed,
                                                                 unsigned long long index)
{
    unsigned long long z = seed * 0x9E3779B97F4A7C15ull + index + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (unsigned int)((z ^ (z >> 31)) >> 32);
}

/*
 * Training-mode dropout in place: keep (x * scale) when draw >= threshold, else 0. The seed is
 * *seed_at where given (a captured training step reads each step's seed from the device), else
 * p.seed.
 */
template <typename T>
static __device__ __forceinline__ void dropout(T *x, const unsigned long long *seed_at,
                                               const AlexnetDropoutParams &p)
{
    const unsigned long long seed = seed_at != 0 ? *seed_at : p.seed;
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len)
    {
        const bool keep = alexnet_keep_draw(seed, i) >= p.threshold;
        x[i] = alexnet_store<T>(keep ? alexnet_load(x[i]) * p.scale : 0.0f);
    }
}

/* Dropout on f32 activations. */
extern "C" __global__ void dropout_f32(float *x, const unsigned long long *seed_at,
                                       AlexnetDropoutParams p)
{
    dropout<float>(x, seed_at, p);
}

/* Dropout on f16 activations. */
extern "C" __global__ void dropout_f16(unsigned short *x, const unsigned long long *seed_at,
                                       AlexnetDropoutParams p)
{
    dropout<unsigned short>(x, seed_at, p);
}

/* The same over bf16 storage. */
extern "C" __global__ void dropout_bf16(alexnet_bf16 *x, const unsigned long long *seed_at,
                                        AlexnetDropoutParams p)
{
    dropout<alexnet_bf16>(x, seed_at, p);
}
