/*
 * loss.cu — softmax cross-entropy and its gradient for training (see AlexnetSoftmaxXentParams).
 * CPU twin: `cpu::softmax_cross_entropy` (src/cpu/loss.rs); launcher: src/cuda/ops/loss.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"
#include "alexnet_reduce.cuh"

/*
 * softmax_xent_f32(const float *logits, const unsigned int *labels, float *grad,
 *                  double *row_loss, AlexnetSoftmaxXentParams p)
 * One block of ALEXNET_SOFTMAX_BLOCK threads per row (grid-stride over rows): the row's loss
 * log(sum exp) - logit[label] into row_loss[row] (f64; the mean is the caller's), and the
 * gradient of the batch mean, (softmax - onehot) / rows, into grad. In f64 like the CPU; a
 * label outside [0, classes) gives a NaN loss and gradient row (the launcher refuses them).
 */
extern "C" __global__ void softmax_xent_f32(const float *logits, const unsigned int *labels,
                                            float *grad, double *row_loss,
                                            AlexnetSoftmaxXentParams p)
{
    __shared__ double scratch[ALEXNET_SOFTMAX_BLOCK];
    const double rows = (double)p.rows;
    for (unsigned int row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const float *z = logits + (unsigned long long)row * p.classes;
        float *g = grad + (unsigned long long)row * p.classes;
        /* The CPU takes the f32 maximum (NaN is skipped by its fold: max ignores NaN). */
        float local_max = __int_as_float(0xff800000);
        for (unsigned int j = threadIdx.x; j < p.classes; j += blockDim.x)
            local_max = z[j] > local_max ? z[j] : local_max;
        const double max = alexnet_block_reduce<true>((double)local_max, scratch);
        double local_sum = 0.0;
        for (unsigned int j = threadIdx.x; j < p.classes; j += blockDim.x)
            local_sum += exp((double)z[j] - max);
        const double log_sum = max + log(alexnet_block_reduce<false>(local_sum, scratch));
        const unsigned int label = labels[row];
        const bool valid = label < p.classes;
        for (unsigned int j = threadIdx.x; j < p.classes; j += blockDim.x) {
            float v = (float)(exp((double)z[j] - log_sum) / rows);
            if (j == label)
                v = __fadd_rn(v, -(1.0f / (float)p.rows));
            g[j] = valid ? v : __int_as_float(0x7fc00000);
        }
        if (threadIdx.x == 0)
            row_loss[row] = valid ? log_sum - (double)z[label] : (double)__int_as_float(0x7fc00000);
    }
}

