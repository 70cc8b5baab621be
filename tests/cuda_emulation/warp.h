// Warp-level operations of the host emulation (included by emulate.h): mma.sync, ldmatrix,
// cp.async and shuffles as ffi/cuda/kernel_common.cuh uses them, with the operand layouts of the
// PTX ISA.
//
// The 32 threads of a warp are real threads (emulate.h's launch runs every thread of a block).
// A warp-wide operation is a rendezvous: each lane writes its operands into its slot of the
// warp's exchange area, waits at the warp's barrier, and then computes its own result from the
// slots of all 32 lanes. The exchange area is double-buffered: a lane can only overwrite buffer
// b again two operations later, after passing the barrier of the operation in between, which
// every lane reaches only once it has finished reading buffer b. So one barrier per operation.
//
// cp.async copies are queued per thread and performed when a cp_async_wait releases their group
// (not when issued), so a kernel that reads its shared tile before waiting reads stale data and
// fails its test. A thread that ends with copies neither committed nor waited for counts as a
// kernel error (the launch then fails).
//
// Shared-memory bank conflicts are counted while emu::count_banks is set (a test switch): each
// ldmatrix matrix (8 rows of 16 bytes) and each warp-wide 16-byte cp.async shared store (in
// quarter warps of 8 lanes, as the hardware serves 128-bit accesses) takes as many wavefronts as
// the most distinct 4-byte words any one of the 32 banks holds among its addresses; the extra
// wavefronts are the conflicts. A warp's n-th cp.async of every lane counts as one instruction
// (the kernels issue the same sequence in every lane). Plain shared loads and stores are not
// counted. emu::plain_shared_layout (a test switch) asks the kernels' tile layout
// (conv2d_mma_tile.cuh) for unswizzled rows, so that a test can show the counts see conflicts.
//
// JAXCONV_EMU_WRONG_FRAGMENT_LAYOUT (a compile-time switch for tests only) swaps the roles of
// a[1] and a[2] in the 16-bit mma's A fragment (rows g+8 <-> columns +8): a kernel that is
// right under the true layout must then compute wrong results, which shows that the tests can
// tell fragment layouts apart.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <deque>
#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace emu {

constexpr int kWarpSize = 32;
constexpr int kSlotBytes = 64;  // the largest per-lane operand set: mma's a, b and c

struct Warp {
  explicit Warp(int lanes) : barrier(lanes), lanes(lanes) {}
  ~Warp();  // counts the bank conflicts of the warp's cp.async stores
  std::barrier<> barrier;
  int lanes;
  std::mutex store_mutex;
  std::map<long, std::array<uintptr_t, 32>> stores;  // n-th cp.async -> each lane's address
  alignas(64) unsigned char slots[2][kWarpSize][kSlotBytes];
};

inline thread_local Warp* this_warp = nullptr;
inline thread_local int this_lane = 0;
inline thread_local int exchange_buffer = 0;
inline std::atomic<int> kernel_errors{0};

inline bool count_banks = false, plain_shared_layout = false;
struct BankCounts {
  std::atomic<long> ldmatrix{0}, ldmatrix_conflicts{0}, stores{0}, store_conflicts{0};
};
inline BankCounts bank_counts;
inline thread_local long cp_async_issued = 0;  // this thread's cp.async count in the launch

// Extra wavefronts of one shared access by `n` addresses of `bytes` (4-byte aligned) each.
inline long bank_conflicts(const uintptr_t* addr, int n, int bytes) {
  std::map<int, std::vector<uintptr_t>> words;  // bank -> distinct word addresses
  for (int i = 0; i < n; ++i)
    for (int b = 0; b < bytes; b += 4) {
      const uintptr_t word = (addr[i] + b) / 4;
      auto& in_bank = words[int(word % 32)];
      bool seen = false;
      for (uintptr_t w : in_bank) seen = seen || w == word;
      if (!seen) in_bank.push_back(word);
    }
  size_t most = 0;
  for (const auto& kv : words) most = kv.second.size() > most ? kv.second.size() : most;
  return long(most) - 1;
}
inline void check_shared_access(const void* p, int bytes);  // emulate.h: dynamic shared bounds

// Every lane's `mine`, gathered; valid until this lane's next warp operation.
template <typename V>
struct Gathered {
  const unsigned char (*slots)[kSlotBytes];
  V operator[](int lane) const {
    V v;
    std::memcpy(&v, slots[lane], sizeof(V));
    return v;
  }
};

template <typename V>
Gathered<V> warp_exchange(const V& mine) {
  static_assert(sizeof(V) <= kSlotBytes, "operands fit a slot");
  Warp* w = this_warp;
  // Warp-wide operations need a full warp (a block size that is a multiple of 32); a partial
  // warp still exchanges among its lanes, but the launch reports an error.
  if (w->lanes != kWarpSize) kernel_errors.fetch_add(1);
  const int b = exchange_buffer;
  exchange_buffer ^= 1;
  std::memcpy(w->slots[b][this_lane], &mine, sizeof(V));
  w->barrier.arrive_and_wait();
  return {w->slots[b]};
}

inline float warp_shfl(float v, int src_lane) { return warp_exchange(v)[src_lane]; }

// ---- ldmatrix ----------------------------------------------------------------------------------

inline void warp_ldmatrix(uint32_t* r, int matrices, bool trans, const void* row) {
  check_shared_access(row, 16);
  const Gathered<const void*> rows = warp_exchange(row);
  const int l = this_lane;
  if (count_banks && l == 0) {
    for (int j = 0; j < matrices; ++j) {
      uintptr_t a[8];
      for (int i = 0; i < 8; ++i) a[i] = reinterpret_cast<uintptr_t>(rows[8 * j + i]);
      bank_counts.ldmatrix_conflicts += bank_conflicts(a, 8, 16);
    }
    bank_counts.ldmatrix += 1;
  }
  for (int j = 0; j < matrices; ++j) {
    uint16_t v[2];
    for (int e = 0; e < 2; ++e) {
      // Element (row i, column c) of matrix j lies in the row whose address lane 8j + i gave.
      const int i = trans ? 2 * (l % 4) + e : l / 4;
      const int c = trans ? l / 4 : 2 * (l % 4) + e;
      std::memcpy(&v[e], static_cast<const unsigned char*>(rows[8 * j + i]) + 2 * c, 2);
    }
    r[j] = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
  }
}

// ---- mma.sync ----------------------------------------------------------------------------------

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline float half_bits_to_float(uint16_t h, int kind) {
  if (kind == 0) {  // bf16: the high half of a float32
    return bits_to_float(uint32_t(h) << 16);
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

struct MmaOperands {
  uint32_t a[4], b[2];
};

// Row and column of the value that register `reg` (half `e` for 16-bit kinds) of lane l holds,
// for A (16 x K) and B (K x 8), K = 16 (16-bit) or 8 (tf32); see kernel_common.cuh.
inline void a_position(int kind, int l, int reg, int e, int* row, int* col) {
  const int g = l / 4, t = l % 4;
  if (kind == 2) {  // tf32
    *row = g + 8 * (reg & 1);
    *col = t + 4 * (reg >> 1);
    return;
  }
#if defined(JAXCONV_EMU_WRONG_FRAGMENT_LAYOUT)
  reg = reg == 1 ? 2 : reg == 2 ? 1 : reg;
#endif
  *row = g + 8 * (reg & 1);
  *col = 2 * t + e + 8 * (reg >> 1);
}
inline void b_position(int kind, int l, int reg, int e, int* row, int* col) {
  const int g = l / 4, t = l % 4;
  *col = g;
  *row = kind == 2 ? t + 4 * reg : 2 * t + e + 8 * reg;
}

// kind: 0 bf16, 1 f16 (m16n8k16), 2 tf32 (m16n8k8). Products of bf16/f16/tf32 values are exact
// in float32; the sum runs over k in order in float32 (the hardware's internal order and
// rounding differ slightly; tests compare with a tolerance).
inline void warp_mma(float* d, const uint32_t* a, const uint32_t* b, int kind) {
  MmaOperands mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  const Gathered<MmaOperands> all = warp_exchange(mine);
  const int K = kind == 2 ? 8 : 16;
  float A[16][16], B[16][8];
  for (int l = 0; l < kWarpSize; ++l) {
    const MmaOperands o = all[l];
    for (int reg = 0; reg < 4; ++reg)
      for (int e = 0; e < (kind == 2 ? 1 : 2); ++e) {
        int row, col;
        a_position(kind, l, reg, e, &row, &col);
        A[row][col] = kind == 2 ? bits_to_float(o.a[reg] & 0xffffe000u)
                                : half_bits_to_float(uint16_t(o.a[reg] >> (16 * e)), kind);
      }
    for (int reg = 0; reg < 2; ++reg)
      for (int e = 0; e < (kind == 2 ? 1 : 2); ++e) {
        int row, col;
        b_position(kind, l, reg, e, &row, &col);
        B[row][col] = kind == 2 ? bits_to_float(o.b[reg] & 0xffffe000u)
                                : half_bits_to_float(uint16_t(o.b[reg] >> (16 * e)), kind);
      }
  }
  const int g = this_lane / 4, t = this_lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float s = d[i];
    for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
    d[i] = s;
  }
}

// ---- cp.async ----------------------------------------------------------------------------------

struct PendingCopy {
  void* dst;
  const void* src;
  int src_bytes;  // 16, or 0: zero fill
};
struct CopyQueue {
  std::vector<PendingCopy> open;                // issued, not yet committed
  std::deque<std::vector<PendingCopy>> groups;  // committed, oldest first
};
inline thread_local CopyQueue copy_queue;

inline void cp_async(void* dst, const void* src, int src_bytes) {
  check_shared_access(dst, 16);
  if (count_banks) {
    std::lock_guard<std::mutex> lock(this_warp->store_mutex);
    this_warp->stores[cp_async_issued++][this_lane] = reinterpret_cast<uintptr_t>(dst);
  }
  copy_queue.open.push_back({dst, src, src_bytes});
}
inline void cp_async_commit() {
  copy_queue.groups.push_back(std::move(copy_queue.open));
  copy_queue.open.clear();
}
inline void cp_async_wait(int pending) {
  while (int(copy_queue.groups.size()) > pending) {
    for (const PendingCopy& c : copy_queue.groups.front()) {
      if (c.src_bytes)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    copy_queue.groups.pop_front();
  }
}

// Called when an emulated thread ends.
inline void end_thread() {
  bool pending = !copy_queue.open.empty();
  for (const auto& grp : copy_queue.groups) pending = pending || !grp.empty();
  if (pending) kernel_errors.fetch_add(1);
  copy_queue = CopyQueue{};
  cp_async_issued = 0;
  exchange_buffer = 0;
  this_warp = nullptr;
}

inline Warp::~Warp() {
  for (const auto& [n, lanes_addr] : stores) {
    for (int q = 0; q < lanes; q += 8)
      bank_counts.store_conflicts += bank_conflicts(lanes_addr.data() + q, 8, 16);
    bank_counts.stores += 1;
  }
}

}  // namespace emu
