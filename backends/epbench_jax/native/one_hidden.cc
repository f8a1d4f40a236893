// Fused phase of the one-hidden-layer layered models (EB-1h, P-1h) for XLA's CPU backend.
//
// n synchronous steps of docs/equations.md, one sample at a time: the sample's states stay in
// L1 cache for the whole phase, and the samples are shared among XLA's intra-op threads (they
// are independent until the parameter update). Layers: s0 (O output units), s1 (H hidden).
//
//   r_i   = rho(s_i) (energy-based) or s_i (prototypical)
//   pre_0 = W01 r_1 + b0                 pre_1 = W01^T r_0 + d_1      (d_1 = W1x u + b1)
//   EB:  s_i += dt (-s_i + rho'(s_i) pre_i)     (no rho'(s0) when sp0 = 0: official code)
//   P:   s_i += dt (-s_i + rho(pre_i))
//   nudged phase: dt * beta (y - s0) added to s0's increment;  clamp: s_i = min(max(s_i, 0), 1)
//
// rho: 0 sigmoid 1/(1 + exp(-4 (v - 1/2))), 1 hard sigmoid clip(v, 0, 1). H a multiple of 16.
// Written with GCC/Clang vector extensions (16 floats: one AVX-512 register, or two AVX2 ones);
// exp: range reduction to [-ln2/2, ln2/2] and the degree-5 polynomial of Cephes' expf
// (S. Moshier's coefficients; relative error below 3e-7 on [-87, 88] against double exp).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Activation { kSigmoid = 0, kHardSigmoid = 1 };

constexpr int64_t kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf clip01(vf v) { return vmin(vmax(v, splat(0.0f)), splat(1.0f)); }
inline float hsum(vf v) {  // pairwise: 16 -> 8 -> 4 -> 2 -> 1 lanes
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// e^x: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial, times 2^n from the bits.
inline vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.3f));
  const vf t = x * splat(1.44269504088896341f) + splat(0.5f);
  vi n = __builtin_convertvector(t, vi);
  n += (__builtin_convertvector(n, vf) > t);  // truncation -> floor (the mask is -1 where true)
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * splat(0.693359375f) - nf * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  const vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return (p * r * r + r + splat(1.0f)) * scale;
}

template <int A>
inline vf rho(vf v) {
  if constexpr (A == kSigmoid) return splat(1.0f) / (splat(1.0f) + vexp(splat(-4.0f) * (v - splat(0.5f))));
  return clip01(v);
}

// rho'(v) given r = rho(v)
template <int A>
inline vf rho_prime(vf v, vf r) {
  if constexpr (A == kSigmoid) return splat(4.0f) * r * (splat(1.0f) - r);
  return (v >= splat(0.0f) && v <= splat(1.0f)) ? splat(1.0f) : splat(0.0f);
}

struct Phase {
  int64_t H, O, n;
  bool sp0, clamp, nudged;
  float dt, beta;
  const float *W, *b0, *d, *y;  // b0, y may be null
  float *s0, *s1;
};

// out[k] = sum_j W[k, j] r[j] for KB rows of W at once: KB independent accumulators, so the
// products are not serialised behind one reduction.
template <int KB>
inline void dots(const float* W, int64_t H, const float* r, float* out) {
  vf acc[KB] = {};
  for (int64_t j = 0; j < H; j += kLanes) {
    const vf rv = load(r + j);
    for (int k = 0; k < KB; ++k) acc[k] += load(W + k * H + j) * rv;
  }
  for (int k = 0; k < KB; ++k) out[k] = hsum(acc[k]);
}

// out = W r for all O rows of W (O × H)
inline void matvec(const float* W, int64_t H, int64_t O, const float* r, float* out) {
  int64_t k = 0;
  for (; k + 8 <= O; k += 8) dots<8>(W + k * H, H, r, out + k);
  switch (O - k) {
    case 7: dots<7>(W + k * H, H, r, out + k); break;
    case 6: dots<6>(W + k * H, H, r, out + k); break;
    case 5: dots<5>(W + k * H, H, r, out + k); break;
    case 4: dots<4>(W + k * H, H, r, out + k); break;
    case 3: dots<3>(W + k * H, H, r, out + k); break;
    case 2: dots<2>(W + k * H, H, r, out + k); break;
    case 1: dots<1>(W + k * H, H, r, out + k); break;
    default: break;
  }
}

// Scratch of one worker: rho(s1) and the output layer padded to whole vectors (the padding
// lanes hold zeros and stay finite).
struct Scratch {
  std::vector<float> r1, s0, r0, pre0, y, b0;
  Scratch(int64_t H, int64_t OP) : r1(H), s0(OP), r0(OP), pre0(OP), y(OP), b0(OP) {}
};

// All n steps of one sample (row b).
template <int A, bool EB>
void run_row(const Phase& p, int64_t b, Scratch& w) {
  const int64_t H = p.H, O = p.O, OP = static_cast<int64_t>(w.s0.size());
  float* s1 = p.s1 + b * H;
  const float* d = p.d + b * H;
  const float* W = p.W;
  float *r1 = w.r1.data(), *s0 = w.s0.data(), *r0 = w.r0.data(), *pre0 = w.pre0.data();
  std::copy_n(p.s0 + b * O, O, s0);
  if (p.nudged) std::copy_n(p.y + b * O, O, w.y.data());
  if (p.b0) std::copy_n(p.b0, O, w.b0.data());
  const vf dt = splat(p.dt), beta = splat(p.nudged ? p.beta : 0.0f);
  for (int64_t t = 0; t < p.n; ++t) {
    for (int64_t k = 0; k < OP; k += kLanes) store(r0 + k, EB ? rho<A>(load(s0 + k)) : load(s0 + k));
    if (EB)
      for (int64_t j = 0; j < H; j += kLanes) store(r1 + j, rho<A>(load(s1 + j)));
    matvec(W, H, O, EB ? r1 : s1, pre0);  // pre_0 = W01 r_1 (+ b0 below)
    // pre_1 = d_1 + W01^T r_0, a vector at a time, and s_1's update right behind it
    for (int64_t j = 0; j < H; j += kLanes) {
      vf pre = load(d + j);
      for (int64_t k = 0; k < O; ++k) pre += splat(r0[k]) * load(W + k * H + j);
      const vf s = load(s1 + j);
      const vf ds = EB ? -s + rho_prime<A>(s, load(r1 + j)) * pre : -s + rho<A>(pre);
      const vf v = s + dt * ds;
      store(s1 + j, p.clamp ? clip01(v) : v);
    }
    for (int64_t k = 0; k < OP; k += kLanes) {
      const vf pre = load(pre0 + k) + load(w.b0.data() + k);
      const vf s = load(s0 + k);
      vf ds;
      if (EB)
        ds = -s + (p.sp0 ? rho_prime<A>(s, load(r0 + k)) : splat(1.0f)) * pre;
      else
        ds = -s + rho<A>(pre);
      ds += beta * (load(w.y.data() + k) - s);
      const vf v = s + dt * ds;
      store(s0 + k, p.clamp ? clip01(v) : v);
    }
  }
  std::copy_n(s0, O, p.s0 + b * O);
}

template <int A, bool EB>
void run_rows(const Phase& p, std::atomic<int64_t>& next, std::atomic<int64_t>& done, int64_t B) {
  Scratch scratch(p.H, (p.O + kLanes - 1) / kLanes * kLanes);
  for (int64_t b; (b = next.fetch_add(1)) < B;) {
    run_row<A, EB>(p, b, scratch);
    done.fetch_add(1, std::memory_order_release);
  }
}

using RowsFn = void (*)(const Phase&, std::atomic<int64_t>&, std::atomic<int64_t>&, int64_t);

RowsFn pick(int32_t activation, bool eb) {
  switch (activation) {
    case kSigmoid: return eb ? run_rows<kSigmoid, true> : run_rows<kSigmoid, false>;
    case kHardSigmoid: return eb ? run_rows<kHardSigmoid, true> : run_rows<kHardSigmoid, false>;
    default: return nullptr;
  }
}

// Work shared by the calling thread and tasks on XLA's intra-op pool. A task that starts after
// every row has been taken returns at once; the caller waits only for rows that were taken.
struct Shared {
  Phase phase;
  RowsFn fn;
  int64_t B;
  std::atomic<int64_t> next{0}, done{0};
};

ffi::Error OneHiddenPhase(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> b0,
                          ffi::Buffer<ffi::F32> d, ffi::Buffer<ffi::F32> s0_in, ffi::Buffer<ffi::F32> s1_in,
                          ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> beta,
                          ffi::ResultBuffer<ffi::F32> s0, ffi::ResultBuffer<ffi::F32> s1, int64_t n,
                          bool energy_based, int32_t activation, bool sigma_prime_out, bool clamp,
                          bool has_bias, bool nudged, float dt) {
  auto wd = W.dimensions();
  auto sd = s1_in.dimensions();
  if (wd.size() != 2 || sd.size() != 2 || s0_in.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("one_hidden_phase: W01, s0 and s1 must be matrices");
  const int64_t O = wd[0], H = wd[1], B = sd[0];
  if (sd[1] != H || s0_in.dimensions()[0] != B || s0_in.dimensions()[1] != O ||
      d.element_count() != B * H || (nudged && y.element_count() != B * O) ||
      (has_bias && b0.element_count() != O))
    return ffi::Error::InvalidArgument("one_hidden_phase: inconsistent shapes");
  RowsFn fn = pick(activation, energy_based);
  if (!fn) return ffi::Error::InvalidArgument("one_hidden_phase: unknown activation");
  if (H % kLanes != 0) return ffi::Error::InvalidArgument("one_hidden_phase: H must be a multiple of 16");

  std::copy_n(s0_in.typed_data(), B * O, s0->typed_data());
  std::copy_n(s1_in.typed_data(), B * H, s1->typed_data());
  auto shared = std::make_shared<Shared>();
  shared->phase = Phase{H, O, n, sigma_prime_out, clamp, nudged, dt, nudged ? beta.typed_data()[0] : 0.0f,
                        W.typed_data(), has_bias ? b0.typed_data() : nullptr, d.typed_data(),
                        nudged ? y.typed_data() : nullptr, s0->typed_data(), s1->typed_data()};
  shared->fn = fn;
  shared->B = B;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), B) - 1;
  for (int64_t i = 0; i < helpers; ++i)
    pool.Schedule([shared] { shared->fn(shared->phase, shared->next, shared->done, shared->B); });
  fn(shared->phase, shared->next, shared->done, B);
  while (shared->done.load(std::memory_order_acquire) < B) {
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EpbenchOneHiddenPhase, OneHiddenPhase,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W01 (O, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b0 (O), or any when has_bias = false
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d1 (B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s0 (B, O)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s1 (B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y (B, O), or any when nudged = false
                                  .Arg<ffi::Buffer<ffi::F32>>()  // beta ()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // s0 after n steps
                                  .Ret<ffi::Buffer<ffi::F32>>()  // s1 after n steps
                                  .Attr<int64_t>("n")
                                  .Attr<bool>("energy_based")
                                  .Attr<int32_t>("activation")
                                  .Attr<bool>("sigma_prime_out")
                                  .Attr<bool>("clamp")
                                  .Attr<bool>("has_bias")
                                  .Attr<bool>("nudged")
                                  .Attr<float>("dt"));
