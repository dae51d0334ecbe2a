/*
 * Kernels that misuse barriers and shuffles on purpose, compiled for the host emulation only
 * (never by nvcc): tests/host_kernels.rs shows that alexnet_host.h reports each misuse as a
 * failed launch, and that the correct twin passes.
 */

/* Every thread waits at the same barrier, then writes its index: correct. */
extern "C" __global__ void check_uniform_barrier(unsigned int *out)
{
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = threadIdx.x;
}

/* Odd threads leave before the barrier the even ones wait at: a GPU hangs or misbehaves. */
extern "C" __global__ void check_divergent_barrier(unsigned int *out)
{
    if (threadIdx.x % 2 == 1)
        return;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = threadIdx.x;
}

/* Even and odd threads wait at two different barriers. */
extern "C" __global__ void check_split_barrier(unsigned int *out)
{
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = threadIdx.x;
}

/* A shuffle with half the warp's mask. */
extern "C" __global__ void check_partial_mask_shuffle(unsigned int *out)
{
    out[blockIdx.x * blockDim.x + threadIdx.x] = __shfl_xor_sync(0x0000ffffu, threadIdx.x, 1);
}

/* A full-mask shuffle: correct in a block of whole warps, undefined in any other. */
extern "C" __global__ void check_full_shuffle(unsigned int *out)
{
    out[blockIdx.x * blockDim.x + threadIdx.x] = __shfl_xor_sync(0xffffffffu, threadIdx.x, 1);
}
