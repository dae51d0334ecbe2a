/*
 * alexnet_abi.h — the one ABI between the CUDA kernels (kernels/*.cu) and Rust.
 *
 * Plain C, no CUDA headers: bindgen turns this file into src/cuda/abi.rs (committed; the test
 * tests/abi_bindgen.rs regenerates it and fails on any difference), so the parameter structs and
 * constants cannot drift between the two sides. Every kernel takes its sizes in one struct
 * passed by value: no host-to-device copy of shapes per launch.
 *
 * Conventions:
 *  - f16 tensors are stored as `unsigned short` (IEEE binary16 bits) on the device; the kernels
 *    convert with inline PTX (kernels/alexnet_half.cuh) so that neither nvcc nor NVRTC needs
 *    cuda_fp16.h.
 *  - Kernel names carry a dtype suffix: `_f32` (float storage) or `_f16` (binary16 storage, f32
 *    arithmetic). Both variants of a family take the same parameter struct.
 *  - `layout` fields take ALEXNET_LAYOUT_NCHW or ALEXNET_LAYOUT_NHWC.
 */
#ifndef ALEXNET_ABI_H
#define ALEXNET_ABI_H

#ifdef __cplusplus
extern "C" {
#endif

/* Threads per block of the 1-D element-wise kernels. */
#define ALEXNET_BLOCK_1D 256
/* Threads per block of softmax_topk (one block per row). */
#define ALEXNET_SOFTMAX_BLOCK 256
/* Largest k softmax_topk returns. */
#define ALEXNET_TOPK_MAX 32

#define ALEXNET_LAYOUT_NCHW 0
#define ALEXNET_LAYOUT_NHWC 1

/* Shape of a 4-D activation tensor; the memory order is given by `layout`. */
typedef struct AlexnetTensorShape {
    unsigned int n;
    unsigned int c;
    unsigned int h;
    unsigned int w;
    unsigned int layout;
} AlexnetTensorShape;

/*
 * prepare_input_{f32,f16}(const unsigned char *src, T *dst, AlexnetPrepareParams p)
 * src: n images, each height x width x 3 bytes (HWC, RGB), contiguous.
 * dst: normalised (x / 255 - mean[c]) / std[c] in `out` (out.c >= 3; channels 3..out.c-1 are
 * written as zeros, e.g. 8 channels so fp16 NHWC convolutions can use tensor cores).
 * One thread per output element (out.n * out.c * out.h * out.w).
 */
typedef struct AlexnetPrepareParams {
    AlexnetTensorShape out;
    float mean[3];
    float std[3];
} AlexnetPrepareParams;

/*
 * relayout_f32_to_{f32,f16}(const float *src, T *dst, AlexnetRelayoutParams p)
 * src: an f32 NCHW tensor of out.n x src_channels x out.h x out.w values, contiguous.
 * dst: the same values in `out` (its layout; out.c >= src_channels; channels src_channels and
 * up written as zeros), rounded to T once. One thread per output element.
 */
typedef struct AlexnetRelayoutParams {
    AlexnetTensorShape out;
    unsigned int src_channels;
} AlexnetRelayoutParams;

/*
 * bias_act_{f32,f16}(T *x, const T *bias, AlexnetBiasActParams p)
 * In place: x += bias[channel]; then ReLU if `relu` != 0 (NaN stays NaN).
 * `channels` is the bias length; `inner` is the number of consecutive elements that share one
 * channel (h * w for NCHW activations, 1 for NHWC and for [rows, features] matrices).
 * One thread per element (`len`).
 */
typedef struct AlexnetBiasActParams {
    unsigned long long len;
    unsigned int channels;
    unsigned int inner;
    unsigned int relu;
} AlexnetBiasActParams;

/*
 * lrn_{f32,f16}(const T *src, T *dst, AlexnetLrnParams p)
 * The paper's inter-channel LRN: dst_c = a_c / (k + alpha * sum_{j=c-size/2}^{c+(size-1)/2} a_j^2)^beta,
 * window clipped at the channel edges, alpha NOT divided by size. If `relu_first` != 0, every a
 * is max(src, 0) (the ReLU before the LRN fused in; NaN stays NaN). src and dst must not overlap.
 * One thread per element of `shape`.
 */
typedef struct AlexnetLrnParams {
    AlexnetTensorShape shape;
    unsigned int size;
    float k;
    float alpha;
    float beta;
    unsigned int relu_first;
} AlexnetLrnParams;

/*
 * maxpool_{f32,f16}(const T *src, T *dst, AlexnetPoolParams p)
 * Max over kernel x kernel windows with `stride`, no padding, floor mode; NaN propagates.
 * `in` and `out` share n, c and layout. One thread per output element.
 */
typedef struct AlexnetPoolParams {
    AlexnetTensorShape in;
    unsigned int out_h;
    unsigned int out_w;
    unsigned int kernel;
    unsigned int stride;
} AlexnetPoolParams;

/*
 * conv_epilogue_{f32,f16}(const T *src, const T *bias, T *dst, AlexnetConvEpilogueParams p)
 * Everything between a convolution and the next layer in one pass: dst = maxpool(lrn(relu(src +
 * bias[c]))) (the LRN only if `has_lrn` != 0), with `lrn.shape` the convolution's output and
 * `pool.in` equal to it. Each intermediate is rounded to T exactly where the separate kernels
 * (bias_act, lrn, maxpool) store it, so the result is theirs bit for bit. One thread per output
 * element of the pooling; src and dst must not overlap.
 */
typedef struct AlexnetConvEpilogueParams {
    AlexnetLrnParams lrn;
    AlexnetPoolParams pool;
    unsigned int has_lrn;
} AlexnetConvEpilogueParams;

/*
 * dropout_{f32,f16}(T *x, const unsigned long long *seed_at, AlexnetDropoutParams p)
 * The seed is *seed_at if seed_at is not null (read on the device: a captured training step's
 * seeds change every step), else p.seed.
 * In place, training mode: element i is kept when draw(seed, i) >= threshold (threshold = p * 2^32)
 * and multiplied by `scale` (1/(1-p) inverted, 1 classic), else set to 0. draw() is the same
 * counter-based hash as the CPU's `cpu::keep_draw`, so both draw the same mask from a seed.
 */
typedef struct AlexnetDropoutParams {
    unsigned long long len;
    unsigned long long seed;
    unsigned int threshold;
    float scale;
} AlexnetDropoutParams;

/*
 * softmax_topk_{f32,f16}(const T *logits, float *probs, unsigned int *top_class,
 *                        float *top_prob, AlexnetSoftmaxParams p)
 * One block of ALEXNET_SOFTMAX_BLOCK threads per row of `classes` logits. Writes the row's
 * softmax (f32) to probs (skipped when `write_probs` == 0; probs may then be null) and the k
 * most probable classes, most probable first, ties to the lower index, to
 * top_class[row * k .. row * k + k] and top_prob[...]. 1 <= k <= ALEXNET_TOPK_MAX.
 */
typedef struct AlexnetSoftmaxParams {
    unsigned int rows;
    unsigned int classes;
    unsigned int k;
    unsigned int write_probs;
} AlexnetSoftmaxParams;

/*
 * AlexnetStepSettings: what a training step may change from one step to the next, in device
 * memory. The host writes it before each step and the kernels given it (convert_f32_to_f16,
 * grad_unscale, sgd) read it when they run, so a step captured in a CUDA graph follows a new
 * learning rate or loss scale without being captured again. inv_loss_scale is 1 / loss_scale
 * rounded to f32 by the host; first_step != 0: SGD's velocity holds nothing yet.
 */
typedef struct AlexnetStepSettings {
    float learning_rate;
    float loss_scale;
    float inv_loss_scale;
    unsigned int first_step;
} AlexnetStepSettings;

/*
 * convert_f16_to_f32(const unsigned short *src, float *dst, AlexnetConvertParams p)
 * dst = src * scale in f32: exact widening when scale is 1.
 * convert_f32_to_f16(const float *src, unsigned short *dst, const AlexnetStepSettings *settings,
 *                    AlexnetConvertParams p)
 * dst = src * scale, the f32 product rounded to nearest f16 (even on ties): a training batch
 * into f16 (scale 1), the loss gradient into the scaled f16 gradient (the loss scale). If
 * `settings` is not null, settings->loss_scale is the scale and p.scale is not used.
 * One thread per element; src and dst do not overlap.
 */
typedef struct AlexnetConvertParams {
    unsigned long long len;
    float scale;
} AlexnetConvertParams;

/* maxpool_backward's parameters: the forward's, and whether the ReLU before it is fused in. */
typedef struct AlexnetPoolBackwardParams {
    AlexnetPoolParams pool;
    unsigned int relu_first;
} AlexnetPoolBackwardParams;


/*
 * maxpool_backward_f32(const float *src, const float *out, const float *grad_out,
 *                      float *grad_in, AlexnetPoolBackwardParams p)
 * (and _f16: the same over f16 storage, f32 sums)
 * The backward of maxpool (p.pool) for training: src is the forward's input, out its output
 * (what maxpool wrote from src: each window's maximum), grad_out shaped like out, grad_in like
 * src. Each input element gets the sum of the output gradients of the windows whose maximum it
 * is (the first strictly larger value, or the last NaN), windows in (oy, ox) order. With
 * relu_first the backward of maxpool(max(src, 0)) (out is that pooling's output): the ReLU's
 * backward too (grad_in 0 where src is not positive, or NaN), so the ReLU before a pooling needs
 * no relu_backward of its own. One thread per input element; no buffer may overlap another.
 *
 * lrn_backward_f32(const float *src, const float *grad_out, float *grad_in, AlexnetLrnParams p)
 * (and _f16: the same over f16 storage, f32 arithmetic, each result rounded once)
 * The backward of the LRN: src is its input, grad_out and grad_in are shaped like it. With
 * relu_first the backward of lrn(max(src, 0)): the ReLU's backward too (grad_in 0 where src is
 * not positive, or NaN), so the ReLU before an LRN needs no relu_backward of its own.
 * With D_c = k + alpha * (window sum of squares) and b_c = a_c D_c^-beta:
 * grad_in_i = g_i D_i^-beta - 2 alpha beta a_i sum_{c : i in window(c)} g_c a_c D_c^-beta / D_c.
 * A window of at most ALEXNET_LRN_BACKWARD_RING channels: one thread per pixel of an image and
 * run of ALEXNET_LRN_BACKWARD_CHUNK channels, each D_c computed once per run (and size - 1 of
 * them by two runs: those whose windows reach across the runs' edge). A wider window: one
 * thread per element. No buffer may overlap another.
 */
/* The widest LRN window whose backward keeps its terms in a per-thread ring (a power of two). */
#define ALEXNET_LRN_BACKWARD_RING 16
/* Channels one thread of the ring backward finishes. */
#define ALEXNET_LRN_BACKWARD_CHUNK 32

/*
 * relu_backward_f32(const float *output, float *grad, AlexnetReluBackwardParams p) (and _f16)
 * In place: grad = output > 0 ? grad : 0 over `len` elements (NaN output passes nothing).
 */
typedef struct AlexnetReluBackwardParams {
    unsigned long long len;
} AlexnetReluBackwardParams;

/* The most threads per block of bias_grad (one block per channel): the launcher picks the
 * smallest power of two (from 32) that leaves each thread at most ALEXNET_BIAS_GRAD_PER_THREAD
 * positions, up to this; only blocks of this size give a thread more. */
#define ALEXNET_BIAS_GRAD_BLOCK 1024
/* Loads each bias_grad thread keeps in flight (one iteration's positions). */
#define ALEXNET_BIAS_GRAD_PER_THREAD 8

/*
 * bias_grad_{f32,f16}(const T *grad, float *bias_grad, AlexnetBiasGradParams p)
 * A bias's gradient for training: bias_grad[c] = the sum over o < outer and i < inner of
 * grad[(o * channels + c) * inner + i], summed in f64 in a fixed order and written (not added)
 * as f32. An NCHW convolution's gradient has outer = N, inner = H * W; an NHWC one outer =
 * N * H * W, inner = 1; a linear layer's [rows, cols] outer = rows, inner = 1. One block per
 * channel (grid-stride over channels) of any power-of-two size up to ALEXNET_BIAS_GRAD_BLOCK.
 */
typedef struct AlexnetBiasGradParams {
    unsigned long long outer;
    unsigned long long inner;
    unsigned int channels;
} AlexnetBiasGradParams;

/* bias_grad_columns: channels per block (one per lane of a warp) and the most threads a block
 * may have (a multiple of ALEXNET_BIAS_COLUMNS_TILE: one warp per row in flight). */
#define ALEXNET_BIAS_COLUMNS_TILE 32
#define ALEXNET_BIAS_COLUMNS_BLOCK 256
/* The f64 partial sums each GPU keeps for bias_grad_columns (256 KiB): splits * channels fit. */
#define ALEXNET_BIAS_PARTIALS 32768

/*
 * bias_grad_columns_{f32,f16}(const T *grad, double *partials, AlexnetBiasColumnsParams p)
 * bias_grad_finish_f32(const double *partials, float *bias_grad, AlexnetBiasColumnsParams p)
 * The bias gradient of a gradient whose channel axis is innermost (NHWC, a linear layer's
 * [rows, cols]): grad[r * channels + c] for r < rows. bias_grad's one block per channel reads
 * such a gradient a channel at a time, strided by the row; here a warp reads a row's 32
 * consecutive channels (coalesced) and the rows are split so that many blocks share a channel.
 * The first kernel writes partials[s * channels + c] = the f64 sum of rows
 * [s * rows_per_split, min(rows, (s + 1) * rows_per_split)) of channel c, for s < splits (work
 * item = (split, tile of 32 channels), grid-stride: any grid is correct); the second sums each
 * channel's partials in split order and writes (not adds) the f32 result. Everything runs in
 * a fixed order for a given launch shape: the result is the same from run to run. splits *
 * channels <= ALEXNET_BIAS_PARTIALS; blockDim.x a multiple of ALEXNET_BIAS_COLUMNS_TILE up to
 * ALEXNET_BIAS_COLUMNS_BLOCK.
 */
typedef struct AlexnetBiasColumnsParams {
    unsigned long long rows;
    unsigned long long rows_per_split;
    unsigned int channels;
    unsigned int splits;
} AlexnetBiasColumnsParams;

/*
 * softmax_xent_f32(const float *logits, const unsigned int *labels, float *grad,
 *                  double *row_loss, AlexnetSoftmaxXentParams p)
 * Softmax cross-entropy of `rows` rows of `classes` logits against labels[row], computed in f64:
 * row_loss[row] = log(sum_j exp(z_j)) - z[label] and grad = (softmax - onehot(label)) / rows
 * (the gradient of the batch mean). One block per row, blockDim.x a power of two no larger than
 * ALEXNET_SOFTMAX_BLOCK. A label >= classes makes its row's loss and gradient NaN.
 */
typedef struct AlexnetSoftmaxXentParams {
    unsigned int rows;
    unsigned int classes;
} AlexnetSoftmaxXentParams;

/*
 * grad_unscale_{f32,f16}(const T *src, float *dst, unsigned int *found_nonfinite,
 *                        const AlexnetStepSettings *settings, AlexnetGradUnscaleParams p)
 * Mixed precision's gradient unscaling: dst[i] = (float)src[i] * inv_scale over `len` elements
 * (one f32 rounding; settings->inv_loss_scale instead of p.inv_scale if `settings` is not
 * null), and *found_nonfinite |= 1 if any dst[i] is infinite or NaN (the loss scale
 * overflowed: the caller skips the step and lowers the scale). *found_nonfinite is only ever set,
 * never cleared: zero it before the first launch of a step. For f32, src and dst may be the same
 * buffer (each element is read, then written by one thread).
 */
typedef struct AlexnetGradUnscaleParams {
    unsigned long long len;
    float inv_scale;
} AlexnetGradUnscaleParams;

/* SGD update rules (AlexnetSgdParams.rule). */
#define ALEXNET_SGD_PYTORCH 0
#define ALEXNET_SGD_PAPER 1
/* Most parameter tensors one sgd launch updates. */
#define ALEXNET_SGD_SEGMENTS 32
/* The storage of the weights' copies (AlexnetSgdParams.copy_format). */
#define ALEXNET_SGD_COPY_F16 0
#define ALEXNET_SGD_COPY_BF16 1

/*
 * sgd_f32(const float *grads, float *velocity, const unsigned int *skip,
 *         const AlexnetStepSettings *settings, AlexnetSgdParams p)
 * One SGD step with momentum over `len` parameters in up to ALEXNET_SGD_SEGMENTS tensors. The
 * gradients and velocities lie end to end in `grads` and `velocity`: segment s holds the elements
 * below ends[s] (and from ends[s-1]). Each tensor's weights stay wherever their layer keeps them:
 * weights[s] is the device address of segment s's first weight (f32: the master weights under
 * mixed precision). If copies[s] != 0 it is the address of a copy of that tensor in f16
 * (copy_format ALEXNET_SGD_COPY_F16) or bf16 (ALEXNET_SGD_COPY_BF16), what a mixed-precision layer
 * computes with, rewritten with each new weight rounded to nearest even in that type. Segment s is
 * decayed with `weight_decay` if decay[s] != 0. A segment with weights[s] == 0 is padding (a gap
 * that keeps the next tensor's gradient aligned): its gradients and velocities are neither read
 * nor written, and it has no copy. ALEXNET_SGD_PYTORCH: v = m v + (g + wd w),
 * w -= lr v; ALEXNET_SGD_PAPER: v = m v - wd lr w - lr g, w += v. With `first_step` != 0 the old
 * velocity is taken as 0 without being read. If `skip` is not null and *skip != 0 (a mixed-
 * precision step whose gradients overflowed) nothing is read or written. If `settings` is not
 * null, settings->learning_rate and settings->first_step are used instead of p's. 1 <= segments
 * <= ALEXNET_SGD_SEGMENTS; no weight tensor or copy may overlap another or the flat buffers.
 */
typedef struct AlexnetSgdParams {
    unsigned long long len;
    unsigned long long ends[ALEXNET_SGD_SEGMENTS];
    unsigned long long weights[ALEXNET_SGD_SEGMENTS];
    unsigned long long copies[ALEXNET_SGD_SEGMENTS];
    unsigned int decay[ALEXNET_SGD_SEGMENTS];
    unsigned int segments;
    unsigned int rule;
    unsigned int first_step;
    unsigned int copy_format;
    float learning_rate;
    float momentum;
    float weight_decay;
} AlexnetSgdParams;

#ifdef __cplusplus
}
#endif

#endif /* ALEXNET_ABI_H */
