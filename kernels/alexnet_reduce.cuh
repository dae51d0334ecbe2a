/*
 * alexnet_reduce.cuh — a block-wide reduction in a fixed tree order, shared by the kernels that
 * sum or take maxima across a block (loss.cu, bias_act.cu). The order is the same on every run
 * and every card, so the results are deterministic.
 */
#ifndef ALEXNET_REDUCE_CUH
#define ALEXNET_REDUCE_CUH

/*
 * The block's reduction of `v` (max or sum) in a fixed tree order: every thread gets it.
 * `scratch` holds blockDim.x doubles in shared memory; blockDim.x is a power of two.
 */
template <bool Max>
static __device__ __forceinline__ double alexnet_block_reduce(double v, double *scratch)
{
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            const double other = scratch[threadIdx.x + half];
            const double mine = scratch[threadIdx.x];
            scratch[threadIdx.x] = Max ? (other > mine ? other : mine) : mine + other;
        }
        __syncthreads();
    }
    const double result = scratch[0];
    __syncthreads();
    return result;
}

#endif
