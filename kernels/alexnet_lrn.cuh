/*
 * alexnet_lrn.cuh — the per-element arithmetic of the paper's LRN, shared by lrn.cu and
 * conv_epilogue.cu so both compute it exactly as the CPU does (`cpu::Lrn`, src/cpu/lrn.rs).
 */
#ifndef ALEXNET_LRN_CUH
#define ALEXNET_LRN_CUH

#include "alexnet_abi.h"

/* The channels [first, last] whose squares are summed for channel c: [c - size/2,
 * c + (size-1)/2], clipped at the edges. */
static __device__ __forceinline__ void alexnet_lrn_window(unsigned int c, const AlexnetLrnParams &p,
                                                          unsigned int &first, unsigned int &last)
{
    const unsigned int before = p.size / 2;
    const unsigned int after = p.size > 0 ? (p.size - 1) / 2 : 0;
    first = c > before ? c - before : 0;
    const unsigned long long last_wide = (unsigned long long)c + after;
    last = last_wide < p.shape.c ? (unsigned int)last_wide : p.shape.c - 1;
}

/* a / (k + alpha * sum)^beta, `sum` the window's sum of squares. Products and sums use
 * __fmul_rn/__fadd_rn (never contracted into FMAs) in the CPU's order, and beta = 0.75 takes the
 * CPU's two square roots, so f32 results match the CPU bit for bit. */
static __device__ __forceinline__ float alexnet_lrn_value(float a, float sum,
                                                          const AlexnetLrnParams &p)
{
    const float base = __fadd_rn(p.k, __fmul_rn(p.alpha, sum));
    if (p.beta == 0.75f) {
        const float r = sqrtf(base);
        return a / __fmul_rn(r, sqrtf(r));
    }
    return a / powf(base, p.beta);
}

#endif /* ALEXNET_LRN_CUH */
