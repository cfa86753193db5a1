"""Compiled CPU kernels built on first use: per-row top-k of float scores, the top-k backward (Gupta et al. 2021, 3.1).

Selecting the ``k`` largest of ``n`` scores does not need to order all ``n``. Per row:

1. split the first ``m * g`` entries into ``m = 4k`` groups of ``g`` and take each group's
   maximum (one vectorised pass);
2. ``tau`` = the k-th largest of those maxima: ``k`` distinct entries are ``>= tau``, so
   every entry of the top k is too (a lower bound, exact whatever the data);
3. one more vectorised pass collects the entries ``>= tau`` (about ``1.1 k`` to ``2 k`` on
   attention scores; all of them when most are equal or ``-inf``);
4. ``nth_element`` among those gives the top k.

That is about two reads of the row instead of an introselect over all of it. Rows shorter
than the slots (``len < k``) return what they have and fill the rest with ``-inf`` at key 0.
NaN ranks above every number, as in numpy and ``torch.topk``: a row with a NaN takes the
exact selection over the whole row. Ties at the k-th value are broken by position in the
survivor list (any of the tied entries is a correct answer).

The C++ source below is compiled with the system C++ compiler (``$CXX`` or ``g++``) into a
shared library under ``paths.cache() / "native"`` (``~/.cache/topk-lab/native``), named by a hash
of the source, the flags and the CPU, and loaded with :mod:`ctypes` (which releases the GIL,
so Python threads run rows in parallel). Building takes about a second, once per machine.
Without a compiler :func:`load` returns ``None`` and the kernels use
:class:`~topk_lib.kernels.selection.RowSelector`'s numpy path; ``TOPK_LAB_NATIVE=0`` forces
that.

The same library holds the top-k attention backward of :mod:`.backward` (``topk_backward_f32``,
``topk_backward_f64``, :data:`BACKWARD_SOURCE`): per query row the gradients through its kept
entries, with no score chunk or sparse matrix built; without the library the backward runs
the sparse products of :mod:`.product`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from topk_lib.infra import paths

__all__ = ["load", "available", "topk_rows", "SOURCE", "BACKWARD_SOURCE"]

#: The fused backward of :mod:`.backward`: per query row, the gradients through its kept entries.
BACKWARD_SOURCE = r"""
namespace {

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
inline void axpy(T a, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// The next kept rows are random rows of K, V, dK, dV (far beyond L2): fetch them PF entries ahead.
constexpr int64_t PF = 8;
template <typename T>
inline void prefetch_row(const T* row, int64_t n, int write) {
  for (int64_t o = 0; o < n; o += 64 / (int64_t)sizeof(T)) write ? __builtin_prefetch(row + o, 1) : __builtin_prefetch(row + o);
}

// Rows (g, l), g < G, l0 <= l < l1, of one (batch, key/value head) group: q, go, idx, lse, dq hold
// the group's G * Lq rows (row g * Lq + l), k, v, dk, dv its Lk keys; the float mask value of
// row (g, l) at key c is mask[g * msg + l * msl + c * msk]. Null dq, dk, dv are not computed.
// Per row: s_j = scale q.k_j (+ mask), p_j = exp(s_j - lse), dp_j = go.v_j, delta = sum p_j dp_j,
// ds_j = p_j (dp_j - delta); dq = scale sum ds_j k_j, dk_j += ds_j scale q, dv_j += p_j go.
template <typename T, typename L>
void backward_rows(const T* q, const T* go, const int32_t* idx, const L* lse, T* dq, const T* k, const T* v,
                   T* dk, T* dv, const T* mask, int64_t msg, int64_t msl, int64_t msk, int64_t G, int64_t Lq,
                   int64_t l0, int64_t l1, int64_t kk, int64_t d, int64_t dvd, double scale_d) {
  const T scale = (T)scale_d;
  std::vector<T> p(kk), dp(kk), qs(d), acc(d);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t r = g * Lq + l;
      const int32_t* ix = idx + r * kk;  // -1: a slot with no kept key
      const L shift = std::isinf(lse[r]) ? (L)0 : lse[r];  // -inf: a row that kept nothing
      const T* gr = go + r * dvd;
      for (int64_t i = 0; i < d; ++i) qs[i] = q[r * d + i] * scale;  // scaled first, as the forward's scores
      const T* mrow = mask ? mask + g * msg + l * msl : nullptr;
      T delta = 0;
      for (int64_t j = 0; j < kk; ++j) {
        if (j + PF < kk && ix[j + PF] >= 0) {
          prefetch_row(k + ix[j + PF] * d, d, 0);
          prefetch_row(v + ix[j + PF] * dvd, dvd, 0);
          if (dv) prefetch_row(dv + ix[j + PF] * dvd, dvd, 1);
        }
        const int64_t c = ix[j];
        if (c < 0) { p[j] = 0; dp[j] = 0; continue; }
        T s = dot(qs.data(), k + c * d, d);
        if (mrow) s += mrow[c * msk];
        p[j] = (T)std::exp((L)s - shift);
        dp[j] = dot(gr, v + c * dvd, dvd);
        delta += p[j] * dp[j];
        if (dv) axpy(p[j], gr, dv + c * dvd, dvd);
      }
      if (!dq && !dk) continue;
      std::fill(acc.begin(), acc.end(), (T)0);
      for (int64_t j = 0; j < kk; ++j) {
        if (dk && j + PF < kk && ix[j + PF] >= 0) prefetch_row(dk + ix[j + PF] * d, d, 1);
        const int64_t c = ix[j];
        if (c < 0) continue;
        const T ds = p[j] * (dp[j] - delta);  // softmax backward on the kept entries
        if (dq) axpy(ds, k + c * d, acc.data(), d);
        if (dk) axpy(ds, qs.data(), dk + c * d, d);
      }
      if (dq) for (int64_t i = 0; i < d; ++i) dq[r * d + i] = acc[i] * scale;
    }
  }
}

}  // namespace

extern "C" {
void topk_backward_f32(const float* q, const float* go, const int32_t* idx, const float* lse, float* dq,
                       const float* k, const float* v, float* dk, float* dv, const float* mask, int64_t msg,
                       int64_t msl, int64_t msk, int64_t G, int64_t Lq, int64_t l0, int64_t l1, int64_t kk,
                       int64_t d, int64_t dvd, double scale) {
  backward_rows<float, float>(q, go, idx, lse, dq, k, v, dk, dv, mask, msg, msl, msk, G, Lq, l0, l1, kk, d, dvd,
                              scale);
}
void topk_backward_f64(const double* q, const double* go, const int32_t* idx, const double* lse, double* dq,
                       const double* k, const double* v, double* dk, double* dv, const double* mask, int64_t msg,
                       int64_t msl, int64_t msk, int64_t G, int64_t Lq, int64_t l0, int64_t l1, int64_t kk,
                       int64_t d, int64_t dvd, double scale) {
  backward_rows<double, double>(q, go, idx, lse, dq, k, v, dk, dv, mask, msg, msl, msk, G, Lq, l0, l1, kk, d, dvd,
                                scale);
}
}
"""

SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

template <typename T>
inline bool greater(T a, T b) {  // NaN above everything, as numpy and torch.topk rank it
  if (a != a) return b == b;
  if (b != b) return false;
  return a > b;
}

// Appends to cand the positions i0 + i (i < n) with !(x[i] < tau): the entries >= tau, and NaN.
template <typename T>
int64_t survivors_scalar(const T* x, int64_t i0, int64_t n, T tau, int32_t* cand) {
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    cand[cnt] = (int32_t)(i0 + i);
    cnt += !(x[i] < tau);  // branch-free: survivors are rare, a branch would mispredict on each
  }
  return cnt;
}

template <typename T>
int64_t survivors(const T* x, int64_t i0, int64_t n, T tau, int32_t* cand) {
  return survivors_scalar(x, i0, n, tau, cand);
}

#if defined(__AVX2__)
// lane positions of the set bits of each 8-bit mask, packed to the front (AVX2 has no compress instruction)
struct PackTable {
  alignas(32) int32_t lanes[256][8];
  PackTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int n = 0;
      for (int j = 0; j < 8; ++j) if (mask >> j & 1) lanes[mask][n++] = j;
      for (; n < 8; ++n) lanes[mask][n] = 0;
    }
  }
};
const PackTable pack_table;

template <>
int64_t survivors<float>(const float* x, int64_t i0, int64_t n, float tau, int32_t* cand) {
  const __m256 t = _mm256_set1_ps(tau);
  int64_t cnt = 0, i = 0;
  for (; i + 8 <= n; i += 8) {  // branch-free: store all 8 packed positions, advance by the survivors
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), t, _CMP_NLT_UQ));  // !(x < tau): NaN too
    __m256i pos = _mm256_add_epi32(_mm256_load_si256((const __m256i*)pack_table.lanes[mask]),
                                   _mm256_set1_epi32((int32_t)(i0 + i)));
    _mm256_storeu_si256((__m256i*)(cand + cnt), pos);
    cnt += __builtin_popcount(mask);
  }
  return cnt + survivors_scalar(x + i, i0 + i, n - i, tau, cand + cnt);
}
#endif

// gm[j] = max(x[j], x[j + m], ..., x[j + (g-1) m]); NaN never wins except as x[j] (found later anyway)
template <typename T>
void group_maxima(const T* x, int64_t m, int64_t g, T* gm) {
  for (int64_t j = 0; j < m; ++j) gm[j] = x[j];
  for (int64_t i = 1; i < g; ++i) {
    const T* p = x + i * m;
    for (int64_t j = 0; j < m; ++j) gm[j] = p[j] > gm[j] ? p[j] : gm[j];
  }
}

#if defined(__AVX2__)
template <>
void group_maxima<float>(const float* x, int64_t m, int64_t g, float* gm) {
  int64_t j = 0;
  for (; j + 32 <= m; j += 32) {  // 32 maxima in registers across all g slices: one load and one max per 8
    __m256 a0 = _mm256_loadu_ps(x + j), a1 = _mm256_loadu_ps(x + j + 8);
    __m256 a2 = _mm256_loadu_ps(x + j + 16), a3 = _mm256_loadu_ps(x + j + 24);
    for (int64_t i = 1; i < g; ++i) {
      const float* p = x + i * m + j;
      a0 = _mm256_max_ps(_mm256_loadu_ps(p), a0);  // max_ps(new, acc) keeps acc when new is NaN
      a1 = _mm256_max_ps(_mm256_loadu_ps(p + 8), a1);
      a2 = _mm256_max_ps(_mm256_loadu_ps(p + 16), a2);
      a3 = _mm256_max_ps(_mm256_loadu_ps(p + 24), a3);
    }
    _mm256_storeu_ps(gm + j, a0); _mm256_storeu_ps(gm + j + 8, a1);
    _mm256_storeu_ps(gm + j + 16, a2); _mm256_storeu_ps(gm + j + 24, a3);
  }
  for (; j < m; ++j) {
    float mx = x[j];
    for (int64_t i = 1; i < g; ++i) mx = x[i * m + j] > mx ? x[i * m + j] : mx;
    gm[j] = mx;
  }
}
#endif

// A value tau with at least k of gm[0:m] >= tau, and not many more: bisection on the value
// (counting is one vectorised pass over m entries); nth_element when gm holds non-finite values.
template <typename T>
T lower_bound_of_kth(T* gm, int64_t m, int64_t k) {
  T lo = gm[0], hi = gm[0];
  for (int64_t j = 1; j < m; ++j) { lo = gm[j] < lo ? gm[j] : lo; hi = gm[j] > hi ? gm[j] : hi; }
  if (!(std::isfinite(lo) && std::isfinite(hi))) {
    std::nth_element(gm, gm + (k - 1), gm + m, [](T a, T b) { return greater(a, b); });
    return gm[k - 1] != gm[k - 1] ? -std::numeric_limits<T>::infinity() : gm[k - 1];
  }
  for (int it = 0; it < 24; ++it) {  // invariant: at least k entries >= lo
    T mid = lo + (hi - lo) / 2;
    if (!(mid > lo && mid < hi)) break;
    int64_t c = 0;
    for (int64_t j = 0; j < m; ++j) c += gm[j] >= mid;
    if (c >= k) {
      lo = mid;
      if (c <= k + k / 4) break;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The k-th largest of v[0:n] (finite or infinite, no NaN; n >= k): bisection on the value keeps
// count(v >= lo) >= k > count(v >= hi) with one vectorised count per step; nth_element if it stalls.
template <typename T>
T kth_largest(T* v, int64_t n, int64_t k) {
  T lo = v[0], hi = v[0];
  for (int64_t j = 1; j < n; ++j) { lo = v[j] < lo ? v[j] : lo; hi = v[j] > hi ? v[j] : hi; }
  if (std::isfinite(lo) && std::isfinite(hi)) {
    int64_t c_hi = 0;
    for (int64_t j = 0; j < n; ++j) c_hi += v[j] >= hi;
    if (c_hi >= k) return hi;
    for (int it = 0; it < 80; ++it) {
      T mid = lo + (hi - lo) / 2;
      if (!(mid > lo && mid < hi)) {  // adjacent floats: the k-th value is lo (ties at lo fill the rest)
        return lo;
      }
      int64_t c = 0;
      for (int64_t j = 0; j < n; ++j) c += v[j] >= mid;
      if (c == k) {  // the k-th largest is the smallest value >= mid
        T best = hi;
        for (int64_t j = 0; j < n; ++j) best = (v[j] >= mid && v[j] < best) ? v[j] : best;
        return best;
      }
      if (c > k) lo = mid; else hi = mid;
    }
  }
  std::nth_element(v, v + (k - 1), v + n, [](T a, T b) { return a > b; });
  return v[k - 1];
}

template <typename T>
void select_row(const T* x, int64_t n, int64_t k, T* ov, int64_t* oi, std::vector<T>& gmax,
                std::vector<int32_t>& cand) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (n <= k) {
    for (int64_t i = 0; i < n; ++i) { ov[i] = x[i]; oi[i] = i; }
    for (int64_t i = n; i < k; ++i) { ov[i] = ninf; oi[i] = 0; }
    return;
  }
  int64_t cnt = n;
  bool nan = false;
  const int64_t m = 4 * k, g = n / m;
  if (g >= 2) {
    // group j holds entries j, j + m, j + 2m, ...: its maximum is an elementwise (vectorised)
    // maximum over g contiguous slices of m entries
    T* gm = gmax.data();
    group_maxima(x, m, g, gm);
    // k distinct entries (one per group) are >= tau, so every entry of the top k is too
    const T tau = lower_bound_of_kth(gm, m, k);
    cnt = survivors(x, 0, n, tau, cand.data());
    for (int64_t i = 0; i < cnt; ++i) nan |= x[cand[i]] != x[cand[i]];
  }
  if (g >= 2 && !nan) {  // the k-th value among the survivors, on a contiguous copy, then the entries above it
    T* vals = gmax.data();  // the group maxima are spent; survivors beyond 4k take the slow path below
    if (cnt <= m) {
      for (int64_t i = 0; i < cnt; ++i) vals[i] = x[cand[i]];
      const T kth = kth_largest(vals, cnt, k);
      int64_t above = 0, out = 0;
      for (int64_t i = 0; i < cnt; ++i) above += x[cand[i]] > kth;
      int64_t ties = k - above;  // entries equal to the k-th value that fill the remaining slots
      for (int64_t i = 0; i < cnt && out < k; ++i) {
        T v = x[cand[i]];
        if (v > kth || (v == kth && ties-- > 0)) { oi[out] = cand[i]; ov[out] = v; ++out; }
      }
      return;
    }
  }
  if (g < 2 || nan) {  // short rows, and rows with NaN: select over the whole row
    cnt = n;
    for (int64_t i = 0; i < n; ++i) cand[i] = (int32_t)i;
  }
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.begin() + cnt,
                   [x](int32_t a, int32_t b) { return greater(x[a], x[b]); });
  for (int64_t i = 0; i < k; ++i) { oi[i] = cand[i]; ov[i] = x[cand[i]]; }
}

template <typename T>
void select_rows(const T* s, int64_t rows, int64_t ld, const int64_t* lens, int64_t period, int64_t n, int64_t k,
                 T* ov, int64_t* oi) {
  std::vector<T> gmax(4 * k);
  std::vector<int32_t> cand(std::max<int64_t>(n, 1) + 8);  // + 8: the branch-free stores write past the count
  for (int64_t r = 0; r < rows; ++r) {
    int64_t len = lens ? std::min(lens[r % period], n) : n;
    select_row(s + r * ld, std::max<int64_t>(len, 0), k, ov + r * k, oi + r * k, gmax, cand);
  }
}

}  // namespace

extern "C" {
// rows of `s` start `ld` entries apart; row r has lens[r % period] valid entries (all n when lens is null)
void topk_rows_f32(const float* s, int64_t rows, int64_t ld, const int64_t* lens, int64_t period, int64_t n,
                   int64_t k, float* ov, int64_t* oi) {
  select_rows(s, rows, ld, lens, period, n, k, ov, oi);
}
void topk_rows_f64(const double* s, int64_t rows, int64_t ld, const int64_t* lens, int64_t period, int64_t n,
                   int64_t k, double* ov, int64_t* oi) {
  select_rows(s, rows, ld, lens, period, n, k, ov, oi);
}
}
""" + BACKWARD_SOURCE

FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd"]  # simd pragmas, no runtime
_lock = threading.Lock()
_loaded: dict = {}


def _cpu_tag() -> str:
    try:  # -march=native code must not run on another CPU sharing the cache directory
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build(cxx: str) -> Path | None:
    key = hashlib.sha256("\0".join([SOURCE, cxx, *FLAGS, _cpu_tag()]).encode()).hexdigest()[:16]
    build_dir = paths.cache() / "native"
    lib = build_dir / f"topk_rows_{key}.so"
    if lib.exists():
        return lib
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
        src, out = Path(tmp) / "topk_rows.cpp", Path(tmp) / "topk_rows.so"
        src.write_text(SOURCE)
        done = subprocess.run([cxx, *FLAGS, str(src), "-o", str(out)], capture_output=True, timeout=120)
        if done.returncode != 0:
            return None
        os.replace(out, lib)  # atomic: a concurrent build or reader never sees half a library
    return lib


def load():
    """The compiled library (``ctypes.CDLL``), building it on first use; ``None`` when it cannot be built."""
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        lib = None
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if os.environ.get("TOPK_LAB_NATIVE", "1") != "0" and cxx:
            try:
                path = _build(cxx)
                lib = ctypes.CDLL(str(path)) if path else None
            except (OSError, subprocess.SubprocessError):
                lib = None
        if lib is not None:
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            for name in ("topk_rows_f32", "topk_rows_f64"):
                getattr(lib, name).argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr]
                getattr(lib, name).restype = None
            for name in ("topk_backward_f32", "topk_backward_f64"):
                getattr(lib, name).argtypes = [ptr] * 10 + [i64] * 10 + [ctypes.c_double]
                getattr(lib, name).restype = None
        _loaded["lib"] = lib
        return lib


def available() -> bool:
    """Whether the compiled selection can run here (builds it if needed)."""
    return load() is not None


def topk_rows(scores, k, lens=None):
    """The ``k`` largest entries of each row of ``scores [R, n]`` (CPU float32/float64), in one thread.

    ``lens`` (``None`` or ``R`` ints) counts the entries of each row that take part; slots a
    short row cannot fill hold ``-inf`` at index 0. Returns ``(values [R, k], indices [R, k])``,
    indices int64, in no particular order. Raises ``RuntimeError`` when the library cannot be
    built (no C++ compiler, or ``TOPK_LAB_NATIVE=0``).
    """
    import numpy as np
    import torch

    lib = load()
    if lib is None:
        raise RuntimeError("the compiled selection is not available: install a C++ compiler (g++) or unset "
                           "TOPK_LAB_NATIVE=0")
    if scores.dim() != 2 or scores.dtype not in (torch.float32, torch.float64) or scores.device.type != "cpu":
        raise ValueError(f"scores must be a 2-d CPU float32/float64 tensor, got {tuple(scores.shape)} "
                         f"{scores.dtype} on {scores.device}")
    scores = scores.contiguous()
    rows, n = scores.shape
    vals = scores.new_empty(rows, k)
    idx = torch.empty(rows, k, dtype=torch.int64)
    lens_arr = None if lens is None else np.ascontiguousarray(np.asarray(lens, dtype=np.int64))
    fn = lib.topk_rows_f32 if scores.dtype == torch.float32 else lib.topk_rows_f64
    fn(scores.data_ptr(), rows, n, None if lens_arr is None else lens_arr.ctypes.data, max(rows, 1), n, k,
       vals.data_ptr(), idx.data_ptr())
    return vals, idx
