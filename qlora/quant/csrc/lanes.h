// "A second lane" for the decode products: one helper thread of our own that takes half the rows
// of a big product (decode_cpu.cpp defines the thread; attention_cpu.cpp uses it too). No OpenMP:
// server handler threads can share it safely.
#pragma once

#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace qlora::lanes {

// ---- a second lane ----
// Decoding one token streams ~150 MB of weights through 250 small matrix-vector products; one core
// unpacks 4-bit codes at ~10 GB/s, below what memory gives two. So each product above kSplitMin
// weights is split by rows between the calling thread and one helper thread: every output row is
// still one thread's sum in the same order, so results are bit-identical to one lane.
// The helper is a detached std::thread whose state is never destroyed, so nothing of it runs at
// exit; it spins ~0.2 ms waiting for work (a token's products come ~20 us apart), then sleeps on a
// condition variable. One caller at a time uses it (others, e.g. a server's other handler threads,
// run both halves themselves); a forked child starts its own helper.
struct Lane {
  std::atomic<uint64_t> posted{0}, done{0};
  std::atomic<bool> sleeping{false};
  std::atomic_flag busy = ATOMIC_FLAG_INIT;
  void (*fn)(void*, int) = nullptr;
  void* ctx = nullptr;
  std::mutex m;
  std::condition_variable cv;
  pid_t pid = 0;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Wait until done() holds: spin a few microseconds (the other lane's half of a product takes ~10 us),
// then give the core away while waiting. On a machine with more runnable threads than cores the other
// lane may not be running at all; spinning through whole scheduler time slices then made each product
// wait milliseconds (decode ~30x slower on 2 busy cores), where yielding lets it finish.
template <class Done>
inline void wait_until(Done&& done) {
  for (int spin = 0; !done(); ++spin) {
    if (spin < 4096) {
      cpu_relax();
    } else {
      sched_yield();
    }
  }
}

extern std::atomic<int> g_lanes;  // qlora_decode_threads(): 1 keeps everything on the calling thread
Lane* lane_for_this_process();    // null if no helper thread can be started
constexpr int64_t kSplitMin = int64_t(1) << 16;  // weights; a hand-off costs ~1 us against ~10 us of work

// f(0, true) here and f(1, true) on the helper when it is free and wanted, else f(0, false) then
// f(1, false) here (`together`: whether the two may wait for each other); returns when both ran.
template <class F>
void two_lanes(F&& f) {
  Lane* lane = g_lanes.load(std::memory_order_relaxed) > 1 ? lane_for_this_process() : nullptr;
  if (lane == nullptr || lane->busy.test_and_set(std::memory_order_acquire)) {
    f(0, false), f(1, false);
    return;
  }
  lane->fn = [](void* c, int i) { (*static_cast<F*>(c))(i, true); };
  lane->ctx = &f;
  const uint64_t p = lane->posted.load(std::memory_order_relaxed) + 1;
  lane->posted.store(p);  // seq_cst: ordered before the load of `sleeping` below
  if (lane->sleeping.load()) {
    std::lock_guard<std::mutex> lock(lane->m);
    lane->cv.notify_one();
  }
  f(0, true);
  wait_until([&] { return lane->done.load(std::memory_order_acquire) == p; });
  lane->busy.clear(std::memory_order_release);
}

// rows(o0, o1) over [0, n): split at a multiple of 16 rows when the product has >= kSplitMin weights.
template <class F>
void split_rows(int64_t n, int64_t k, F&& rows) {
  const int64_t half = (n / 2) / 16 * 16;
  if (n * k < kSplitMin || half == 0) {
    rows(int64_t(0), n);
    return;
  }
  two_lanes([&](int lane, bool) { lane == 0 ? rows(int64_t(0), half) : rows(half, n); });
}

}  // namespace qlora::lanes
