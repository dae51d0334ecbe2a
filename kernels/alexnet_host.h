/*
 * alexnet_host.h — runs the kernels of kernels/*.cu as ordinary C++ on the CPU, for tests.
 *
 * Included before a kernel source (never by nvcc or NVRTC), it turns the CUDA keywords into C++:
 * a launch runs the grid one block at a time, each block as `blockDim.x` real threads, so
 *  - `threadIdx`/`blockIdx`/`blockDim`/`gridDim` are per-thread values set by the launcher;
 *  - `__syncthreads()` is a barrier across the block's threads, which also checks that every
 *    thread of the block arrived from the same `__syncthreads` (a barrier in divergent code, or
 *    a thread returning before one, is an error of the launch here where a GPU hangs or
 *    computes garbage);
 *  - `__shfl_xor_sync` exchanges values through a per-warp slot array between two warp barriers;
 *    a mask other than the full warp's, or a block that is not whole warps, is an error of the
 *    launch (the GPU leaves such shuffles undefined);
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

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace alexnet_host {

/* Where a thread reached the block barrier: a `__syncthreads` (its file and line), or the end
 * of the block (`file` null). */
struct Site {
    const char *file;
    int line;
};

inline bool same_site(Site a, Site b)
{
    if (a.line != b.line || (a.file == nullptr) != (b.file == nullptr))
        return false;
    return a.file == b.file || std::strcmp(a.file, b.file) == 0;
}

inline std::string describe(Site site)
{
    if (site.file == nullptr)
        return "the end of the block (it returned)";
    return std::string("__syncthreads at ") + site.file + ":" + std::to_string(site.line);
}

/* The launch's first misuse of a barrier or a shuffle, if any. */
struct Checks {
    std::mutex lock;
    std::string first;
    void report(std::string what) noexcept
    {
        try {
            std::lock_guard<std::mutex> guard(lock);
            if (first.empty())
                first = std::move(what);
        } catch (...) {
            /* Out of memory for the message: the launch still fails, with a shorter one. */
            first = "misuse (message lost)";
        }
    }
};

/* Runs once per phase of the block barrier, when every thread has arrived: all must have come
 * from the same place. */
struct BlockPhase {
    const std::vector<Site> *sites;
    Checks *checks;
    void operator()() noexcept
    {
        const auto &at = *sites;
        for (std::size_t t = 1; t < at.size(); ++t) {
            if (!same_site(at[0], at[t])) {
                try {
                    checks->report("threads 0 and " + std::to_string(t) +
                                   " of a block met at different barriers: " +
                                   describe(at[0]) + " and " + describe(at[t]) +
                                   " (a __syncthreads that not every thread reaches)");
                } catch (...) {
                    checks->report("threads of a block met at different barriers");
                }
                return;
            }
        }
    }
};

using BlockBarrier = std::barrier<BlockPhase>;

/* What one emulated GPU thread knows about itself. */
struct ThreadState {
    dim3 thread_idx, block_idx, block_dim, grid_dim;
    BlockBarrier *block = nullptr;
    std::vector<Site> *sites = nullptr;
    Checks *checks = nullptr;
    std::vector<std::unique_ptr<std::barrier<>>> *warps = nullptr;
    std::vector<std::uint64_t> *shuffle = nullptr;
};


inline thread_local ThreadState self;

/* Arrives at the block barrier from `site` and waits for the whole block. */
inline void sync_block(Site site)
{
    (*self.sites)[self.thread_idx.x] = site;
    self.block->arrive_and_wait();
}

/* Kernels share static `__shared__` storage: one launch at a time in the whole process. */
inline std::mutex launch_lock;

/* Set for a launch (under `launch_lock`): `alexnet_fits_u32` answers false, so the kernels take
 * their 64-bit index path, which a GPU takes only past 2^31 elements, on small tensors too. */
inline bool wide_indices = false;

/* Runs `body` (one kernel invocation) for every thread of `grid` blocks of `block` threads,
 * with 64-bit indices where `wide` (see `wide_indices`): 0 when it ran cleanly, 1 for a refused
 * launch shape, 2 for a misuse of barriers or shuffles (described in `message`, at most
 * `capacity` bytes with the terminating zero). */
template <typename Body>
int launch(unsigned int grid, unsigned int block, bool wide, Body body, char *message,
           std::size_t capacity)
{
    if (grid == 0 || block == 0 || block > 1024)
        return 1;
    std::lock_guard<std::mutex> guard(launch_lock);
    wide_indices = wide;
    std::vector<Site> sites(block, Site{nullptr, 0});
    Checks checks;
    BlockBarrier block_barrier(block, BlockPhase{&sites, &checks});
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
            self.sites = &sites;
            self.checks = &checks;
            self.warps = &warps;
            self.shuffle = &shuffle;
            for (unsigned int b = 0; b < grid; ++b) {
                self.block_idx = dim3{b, 0, 0};
                body();
                /* The block ends before the next starts. After its last block a thread leaves
                 * the barrier, so that a kernel whose threads met at different barriers (and
                 * so arrive a different number of times) fails instead of hanging. */
                if (b + 1 < grid) {
                    sync_block(Site{nullptr, 0});
                } else {
                    sites[tid] = Site{nullptr, 0};
                    block_barrier.arrive_and_drop();
                }
            }
        });
    }
    for (auto &t : threads)
        t.join();
    if (checks.first.empty())
        return 0;
    if (message != nullptr && capacity > 0) {
        const std::size_t n = std::min(capacity - 1, checks.first.size());
        std::memcpy(message, checks.first.data(), n);
        message[n] = '\0';
    }
    return 2;
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

#define __syncthreads() alexnet_host::sync_block(alexnet_host::Site{__FILE__, __LINE__})

/* Every lane of the warp takes part: a partial mask or a partial warp is reported (the launch
 * fails), and then computed as if the missing lanes kept their own values. */
template <typename T> T __shfl_xor_sync(unsigned int mask, T value, int lane_mask)
{
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    auto &s = alexnet_host::self;
    const unsigned int tid = s.thread_idx.x, warp = tid / 32, lane = tid % 32;
    if (mask != 0xffffffffu || s.block_dim.x % 32 != 0 || lane_mask < 0 || lane_mask > 31)
        s.checks->report("__shfl_xor_sync with mask " + std::to_string(mask) + ", lane mask " +
                         std::to_string(lane_mask) + " in a block of " +
                         std::to_string(s.block_dim.x) +
                         " threads: the GPU leaves a shuffle undefined unless the whole warp "
                         "takes part");
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

/* Exposes kernel `name` as `alexnet_host_<name>(grid, block, wide, args, message, capacity)`:
 * see `launch`. */
#define ALEXNET_HOST_ENTRY(name)                                                                   \
    extern "C" int alexnet_host_##name(unsigned int grid, unsigned int block, bool wide,         \
                                       void **args, char *message, std::size_t capacity)         \
    {                                                                                              \
        return alexnet_host::launch(                                                               \
            grid, block, wide, [args] { alexnet_host::call_kernel(name, args); }, message,         \
            capacity);                                                                             \
    }

#endif /* ALEXNET_HOST_H */
