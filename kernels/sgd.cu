/*
 * sgd.cu — one SGD step over every parameter in a single launch (see AlexnetSgdParams): the
 * gradients and velocities flat, the weights where their layers keep them (an address table).
 * CPU twin: `train::Sgd::step` (src/train/sgd.rs); launcher: src/cuda/ops/sgd.rs.
 * Products and sums use __fmul_rn/__fadd_rn in the CPU's order (never contracted into FMAs), so
 * the host build matches the CPU bit for bit.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

/*
 * sgd_f32(const float *grads, float *velocity, const unsigned int *skip,
 *         const AlexnetStepSettings *settings, AlexnetSgdParams p)
 * One step over every parameter at once: the gradients and velocities laid end to end, each
 * tensor's weights at its own address (p.weights[segment]) and, under mixed precision, their f16
 * or bf16 copy (p.copy_format) at p.copies[segment]; the CPU's `train::Sgd::step`: rule ALEXNET_SGD_PYTORCH:
 * v = m v + (g + wd w), w -= lr v; ALEXNET_SGD_PAPER: v = m v - wd lr w - lr g, w += v. Segment s
 * (elements up to ends[s]) uses weight decay `weight_decay` if decay[s] != 0, else none; one
 * without a weight address (p.weights[s] == 0) is padding, left unread and unwritten. On the
 * first step (`first_step`) the old velocity is taken as 0 without being read. A set `*skip`
 * (the overflow flag of the gradients' unscaling) leaves everything as it was. Given `settings`
 * (a captured training step), the learning rate and first-step flag are read from it.
 */
extern "C" __global__ void sgd_f32(const float *grads, float *velocity, const unsigned int *skip,
                                   const AlexnetStepSettings *settings, AlexnetSgdParams p)
{
    if (skip != 0 && *skip != 0)
        return;
    const float learning_rate = settings != 0 ? settings->learning_rate : p.learning_rate;
    const bool first_step = settings != 0 ? settings->first_step != 0 : p.first_step != 0;
    /* A thread's indices only grow, so its segment is searched from the last one it was in:
     * one comparison per element, not one per segment before it. */
    unsigned int segment = 0;
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len)
    {
        while (segment + 1 < p.segments && i >= p.ends[segment])
            ++segment;
        if (p.weights[segment] == 0)
            continue; /* padding: a gap that keeps the next tensor aligned */
        const unsigned long long start = segment == 0 ? 0 : p.ends[segment - 1];
        float *weight = (float *)p.weights[segment] + (i - start);
        const float wd = p.decay[segment] ? p.weight_decay : 0.0f;
        const float w = *weight;
        const float g = grads[i];
        const float previous = first_step ? 0.0f : velocity[i];
        float v, updated;
        if (p.rule == ALEXNET_SGD_PAPER) {
            v = __fadd_rn(__fadd_rn(__fmul_rn(p.momentum, previous),
                                    -__fmul_rn(__fmul_rn(wd, learning_rate), w)),
                          -__fmul_rn(learning_rate, g));
            updated = __fadd_rn(w, v);
        } else {
            v = __fadd_rn(__fmul_rn(p.momentum, previous), __fadd_rn(g, __fmul_rn(wd, w)));
            updated = __fadd_rn(w, -__fmul_rn(learning_rate, v));
        }
        *weight = updated;
        velocity[i] = v;
        if (p.copies[segment] == 0)
            continue;
        if (p.copy_format == ALEXNET_SGD_COPY_BF16)
            ((alexnet_bf16 *)p.copies[segment])[i - start] = alexnet_f2bf(updated);
        else if (p.copy_format == ALEXNET_SGD_COPY_F16)
            ((unsigned short *)p.copies[segment])[i - start] = alexnet_f2h(updated);
    }
}
