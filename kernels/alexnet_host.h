/*
 * alexnet_host.h — runs the kernels of kernels/*.cu as ordinary C++ on the CPU, for tests.
 *
 * Included before a kernel source (never by nvcc or NVRTC), it turns the CUDA keywords into C++:
 * a launch runs the grid one block at a time, each block as `blockDim.x` real threads, so
 *  - `threadIdx`/`blockIdx`/`blockDim`/`gridDim` are per-thread values set by the launcher;
 *  - `__syncthreads()` is a barrier across the block's threads;
 *  - `__shfl_xor_sync` exchanges values through a per-warp slot array between two warp barriers;
 *  - `__shared__` variables are static (one block runs at a time, and launches are serialised);
 *  - `atomicOr` is a std::atomic_ref read-modify-write;
 *  - the f16 conversions of alexnet_half.cuh use the software fallbacks below (bit-exact
 *    round-to-nearest-even), and `__fadd_rn`/`__fmul_rn` are plain operations (the host build
 *    uses -ffp-contract=off, so nothing is fused).
 *
 * What this proves: the kernels' arithmetic and indexing — every element written once and from
 * the right inputs, grid-stride loops, layouts, edges, reductions and their ties. What it does
 * NOT prove: speed, the GPU memory model (ordering, races a real GPU could expose), occupancy,
 * or the GPU compiler's code. Library functions (expf, powf) are the host's: results may differ
 * from the device's in the last bits.
 */
#ifndef ALEXNET_HOST_H
#define ALEXNET_HOST_H

#define ALEXNET_HOST_EMULATION 1

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace alexnet_host {

/* What one emulated GPU thread knows about itself. */
struct ThreadState {
    dim3 thread_idx, block_idx, block_dim, grid_dim;
    std::barrier<> *block = nullptr;
    std::vector<std::unique_ptr<std::barrier<>>> *warps = nullptr;
    std::vector<std::uint64_t> *shuffle = nullptr;
};

inline thread_local ThreadState self;

/* Kernels share static `__shared__` storage: one launch at a time in the whole process. */
inline std::mutex launch_lock;

/* Runs `body` (one kernel invocation) for every thread of `grid` blocks of `block` threads. */
template <typename Body> int launch(unsigned int grid, unsigned int block, Body body)
{
    if (grid == 0 || block == 0 || block > 1024)
        return 1;
    std::lock_guard<std::mutex> guard(launch_lock);
    std::barrier<> block_barrier(block);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (unsigned int first = 0; first < block; first += 32)
        warps.push_back(std::make_unique<std::barrier<>>(block - first < 32 ? block - first : 32));
    std::vector<std::uint64_t> shuffle(block);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned int tid = 0; tid < block; ++tid) {
        threads.emplace_back([&, tid] {
            self.thread_idx = dim3{tid, 0, 0};
            self.block_dim = dim3{block, 1, 1};
            self.grid_dim = dim3{grid, 1, 1};
            self.block = &block_barrier;
            self.warps = &warps;
            self.shuffle = &shuffle;
            for (unsigned int b = 0; b < grid; ++b) {
                self.block_idx = dim3{b, 0, 0};
                body();
                block_barrier.arrive_and_wait(); /* the block ends before the next starts */
            }
        });
    }
    for (auto &t : threads)
        t.join();
    return 0;
}

/* Calls kernel `k` with arguments given the way cuLaunchKernel takes them: args[i] points to
 * the i-th argument's value. */
template <typename... A, std::size_t... I>
void call_kernel(void (*k)(A...), void **args, std::index_sequence<I...>)
{
    k(*static_cast<std::remove_cv_t<A> *>(args[I])...);
}

template <typename... A> void call_kernel(void (*k)(A...), void **args)
{
    call_kernel(k, args, std::index_sequence_for<A...>{});
}

/* binary16 bits -> f32, exact. */
inline float half_to_float(unsigned short h)
{
    const std::uint32_t sign = (std::uint32_t)(h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13); /* inf, NaN (payload kept) */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while ((mant & 0x400u) == 0) {
            mant <<= 1;
            --exp;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

/* f32 -> binary16 bits, round to nearest even; overflow to infinity, NaN stays NaN. */
inline unsigned short float_to_half(float f)
{
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t abs = x & 0x7fffffffu;
    if (abs > 0x7f800000u)
        return (unsigned short)(sign | 0x7e00u | ((abs >> 13) & 0x3ffu)); /* quiet NaN */
    if (abs >= 0x477ff000u)                                              /* rounds to >= 65520 */
        return (unsigned short)(sign | 0x7c00u);
    if (abs < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (abs < 0x33000000u)
            return (unsigned short)sign; /* below half the smallest subnormal */
        const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
        const int shift = 126 - (int)(abs >> 23); /* 14..24 */
        std::uint32_t h = mant >> shift;
        const std::uint32_t rest = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (h & 1u)))
            ++h;
        return (unsigned short)(sign | h);
    }
    std::uint32_t h = ((abs >> 13) - (112u << 10));
    const std::uint32_t rest = abs & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        ++h; /* a carry into the exponent is the right answer */
    return (unsigned short)(sign | h);
}

} // namespace alexnet_host

#define threadIdx (alexnet_host::self.thread_idx)
#define blockIdx (alexnet_host::self.block_idx)
#define blockDim (alexnet_host::self.block_dim)
#define gridDim (alexnet_host::self.grid_dim)

inline void __syncthreads() { alexnet_host::self.block->arrive_and_wait(); }

/* Every lane of the warp takes part (the kernels pass the full mask). */
template <typename T> T __shfl_xor_sync(unsigned int /*mask*/, T value, int lane_mask)
{
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    auto &s = alexnet_host::self;
    const unsigned int tid = s.thread_idx.x, warp = tid / 32, lane = tid % 32;
    std::uint64_t slot = 0;
    std::memcpy(&slot, &value, sizeof(T));
    (*s.shuffle)[tid] = slot;
    (*s.warps)[warp]->arrive_and_wait();
    const unsigned int from = warp * 32 + (lane ^ (unsigned int)lane_mask);
    T out = value; /* a lane outside a partial warp keeps its own value */
    if (from < s.block_dim.x)
        std::memcpy(&out, &(*s.shuffle)[from], sizeof(T));
    (*s.warps)[warp]->arrive_and_wait();
    return out;
}

/* The device's atomic OR, as an atomic read-modify-write on the host thread's view. */
inline unsigned int atomicOr(unsigned int *address, unsigned int value)
{
    return std::atomic_ref<unsigned int>(*address).fetch_or(value);
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline unsigned int __float_as_uint(float f)
{
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned int u)
{
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i)
{
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

/* Exposes kernel `name` as `alexnet_host_<name>(grid, block, args)`; 0 on success. */
#define ALEXNET_HOST_ENTRY(name)                                                                   \
    extern "C" int alexnet_host_##name(unsigned int grid, unsigned int block, void **args)       \
    {                                                                                              \
        return alexnet_host::launch(grid, block,                                                   \
                                    [args] { alexnet_host::call_kernel(name, args); });            \
    }

#endif /* ALEXNET_HOST_H */
