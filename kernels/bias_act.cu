/*
 * bias_act.cu — bias + optional ReLU in place, one thread per element, grid-stride loop (any grid
 * size is correct). CPU twin: `cpu::bias_act` (src/cpu/bias_act.rs); launcher:
 * src/cuda/ops/bias_act.rs.
 */
#include "alexnet_abi.h"
#include "alexnet_half.cuh"

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

/* ---- ReLU backward (training, f32) ----------------------------------------------------- */

/*
 * relu_backward_f32(const float *output, float *grad, AlexnetReluBackwardParams p): in place,
 * grad = output > 0 ? grad : 0 (a NaN output passes nothing, as on the CPU).
 */
extern "C" __global__ void relu_backward_f32(const float *output, float *grad,
                                             AlexnetReluBackwardParams p)
{
    ALEXNET_GRID_STRIDE(unsigned long long, i, p.len)
    {
        if (!(output[i] > 0.0f))
            grad[i] = 0.0f;
    }
}

