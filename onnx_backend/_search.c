/* Range-search kernels of onnx_backend.range_selection: the two searches that score thousands
 * of candidate ranges per tensor.
 *
 * Hand-written because numpy has to pass over a (candidates x levels) temporary a dozen times
 * for what is one loop here: the entropy (KL) search and the two-sided mse/sqnr grid were most
 * of a calibration's time on the bench's models (docs/BENCHMARKS.md). The numpy code in
 * range_selection.py stays as the fallback and as the reference the tests hold these to
 * (tests/test_range_search_kernel.py): the noise grid gives the same doubles (same operations in
 * the same order; built with -ffp-contract=off), KL agrees to rounding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define MAX_LEVELS 4096 /* groups per window, at most (range_selection uses 128 or 256) */

/* log(x) for normal, finite x > 0, to within about 1e-16 (absolute, |log x| < 2; relative
   beyond): x = m 2^e with m in [1, 2); m's top 7 bits pick a centre c of 128 in [1, 2), with
   log(c) and 1/c from a table (filled by libm at import); log(m) = log(c) + log1p(r),
   r = (m - c) / c with |r| <= 2^-8 (m - c is exact), by its series to r^6. No division and no
   int<->double conversion, so the compiler vectorizes the loops it is in (libm's log is a call
   per value, numpy's SIMD log a pass per array). */
#define LOG_TABLE_BITS 7
static double log_centre[1 << LOG_TABLE_BITS], inverse_centre[1 << LOG_TABLE_BITS];

static void fill_log_table(void) {
    for (int i = 0; i < (1 << LOG_TABLE_BITS); i++) {
        const double c = 1.0 + (i + 0.5) / (1 << LOG_TABLE_BITS);
        log_centre[i] = log(c);
        inverse_centre[i] = 1.0 / c;
    }
}

static inline double log_normal(double x) {
    uint64_t bits, mbits, ebits;
    memcpy(&bits, &x, sizeof bits);
    /* e as a double without a conversion instruction: 2^52 + biased exponent, minus 2^52 + 1023 */
    ebits = (bits >> 52) | 0x4330000000000000ULL;
    double e, m;
    memcpy(&e, &ebits, sizeof e);
    e -= 4503599627370496.0 + 1023.0;
    mbits = (bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL; /* m in [1, 2) */
    memcpy(&m, &mbits, sizeof m);
    const uint64_t i = (bits >> (52 - LOG_TABLE_BITS)) & ((1 << LOG_TABLE_BITS) - 1);
    /* c: m with the bits below the top 7 replaced by a half step (1, then zeros) */
    const uint64_t low = (1ULL << (52 - LOG_TABLE_BITS)) - 1, cbits = (mbits & ~low) | (1ULL << (51 - LOG_TABLE_BITS));
    double c;
    memcpy(&c, &cbits, sizeof c);
    const double r = (m - c) * inverse_centre[i];
    double p = -1.0 / 6;
    p = p * r + 1.0 / 5;
    p = p * r - 1.0 / 4;
    p = p * r + 1.0 / 3;
    p = p * r - 1.0 / 2;
    p = p * r + 1.0;
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    return e * ln2_hi + (log_centre[i] + (e * ln2_lo + r * p));
}

static inline double xlogx(double v) { return v > 0 ? v * log(v) : 0.0; }

/* KL(P || Q) of one window [start, end) (see range_selection._kl_windows for the definition and
   the prefix sums C, PL, NZ; c holds the counts). `kd` is 0, 1, ..., levels as doubles; `cb`, `nb`
   are scratch of levels + 1. */
CLONES static double kl_window(const double *c, const double *restrict C, const double *PL, const double *restrict NZ, Py_ssize_t n, int64_t start, int64_t end, int levels, const double *restrict kd, double *restrict cb, double *restrict nb) {
    const double total = C[n], below = C[start], above = total - C[end];
    const double first_c = c[start], last_c = c[end - 1];
    const double plogp = PL[end] - PL[start] - xlogx(first_c) - xlogx(last_c) + xlogx(first_c + below) + xlogx(last_c + above);
    /* Group boundaries start + floor(len * k / levels), computed as numpy does (exact; levels is a
       power of two, so multiplying by its inverse is dividing); the quotient is >= 0, so
       truncating is flooring, and the loop vectorizes. */
    const double len = (double)(end - start), inverse_levels = 1.0 / levels;
    const double *restrict Cs = C + start, *restrict NZs = NZ + start;
    for (int k = 0; k <= levels; k++) {
        const int b = (int)(len * kd[k] * inverse_levels);
        cb[k] = Cs[b];
        nb[k] = NZs[b];
    }
    double inner = 0.0; /* groups 1 .. levels-2: nothing folded into them */
#pragma omp simd reduction(+ : inner)
    for (int k = 1; k < levels - 1; k++) {
        const double mass = cb[k + 1] - cb[k], nonzero = nb[k + 1] - nb[k];
        const double q = log_normal((mass > 0.5 ? mass : 0.5) / (nonzero > 1.0 ? nonzero : 1.0));
        inner += mass * q;
    }
    /* The edge groups take the folded mass, and count an empty edge bin that received it. */
    double m0 = cb[1] - cb[0], n0 = nb[1] - nb[0] + ((first_c == 0) & (below > 0));
    double m1 = cb[levels] - cb[levels - 1], n1 = nb[levels] - nb[levels - 1] + ((last_c == 0) & (above > 0));
    const double edges = (m0 + below) * log((m0 > 0.5 ? m0 : 0.5) / (n0 > 1.0 ? n0 : 1.0)) + (m1 + above) * log((m1 > 0.5 ? m1 : 0.5) / (n1 > 1.0 ? n1 : 1.0));
    const double window = C[end] - C[start] > 0.5 ? C[end] - C[start] : 0.5;
    return (plogp - (inner + edges)) / total - log(total) + log(window);
}

static int is_format(const Py_buffer *b, char code, Py_ssize_t itemsize) {
    const char *f = b->format ? b->format : "B";
    if (f[0] == '=' || f[0] == '@') f++;
    return b->itemsize == itemsize && f[0] == code && f[1] == 0;
}

static int is_int64(const Py_buffer *b) { return is_format(b, 'q', 8) || is_format(b, 'l', 8); }

static void release(Py_buffer *views, int count) {
    for (int i = 0; i < count; i++) PyBuffer_Release(&views[i]);
}

/* Fills `views` with C-contiguous buffers of `objs` (the last `writable` of them writable);
   returns the number filled, or -1 with every one released and an exception set. */
static int get_views(PyObject **objs, Py_buffer *views, int count, int writable) {
    for (int i = 0; i < count; i++) {
        int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (i >= count - writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(objs[i], &views[i], flags) < 0) {
            release(views, i);
            return -1;
        }
    }
    return count;
}

static PyObject *fail(Py_buffer *views, int count, const char *message) {
    release(views, count);
    PyErr_SetString(PyExc_ValueError, message);
    return NULL;
}

/* kl_windows(c, C, PL, NZ, starts, ends, levels, out): out[i] = KL of window [starts[i], ends[i]).
   c: n float64 counts; C, PL, NZ: n + 1 float64 prefix sums; starts, ends: int64 with
   0 <= start, start + levels <= end <= n; levels: a power of two; out: float64, one per window. */
static PyObject *kl_windows(PyObject *self, PyObject *args) {
    PyObject *objs[7];
    int levels;
    Py_buffer v[7];
    if (!PyArg_ParseTuple(args, "OOOOOOiO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &objs[5], &levels, &objs[6])) return NULL;
    if (get_views(objs, v, 7, 1) < 0) return NULL;
    const Py_ssize_t n = v[0].len / 8, windows = v[4].len / 8;
    int ok = levels >= 2 && levels <= MAX_LEVELS && (levels & (levels - 1)) == 0 && n < INT32_MAX;
    for (int i = 0; i < 4; i++) ok &= is_format(&v[i], 'd', 8) && v[i].len / 8 == n + (i > 0);
    ok &= is_int64(&v[4]) && is_int64(&v[5]) && is_format(&v[6], 'd', 8) && v[5].len / 8 == windows && v[6].len / 8 == windows;
    if (!ok) return fail(v, 7, "kl_windows() takes float64 counts (n), three float64 prefix sums (n + 1), int64 starts and ends, levels a power of two in [2, 4096] and a float64 output per window");
    const int64_t *starts = v[4].buf, *ends = v[5].buf;
    for (Py_ssize_t i = 0; i < windows; i++)
        if (starts[i] < 0 || ends[i] > n || ends[i] - starts[i] < levels) return fail(v, 7, "kl_windows(): a window lies outside the histogram or spans fewer bins than levels");
    /* On the heap: 3 x 4097 doubles would take 96 KiB of a thread's stack (128 KiB on musl). */
    double *scratch = malloc(3 * (size_t)(levels + 1) * sizeof(double));
    if (scratch == NULL) {
        release(v, 7);
        return PyErr_NoMemory();
    }
    double *kd = scratch, *cb = scratch + levels + 1, *nb = scratch + 2 * (levels + 1);
    for (int k = 0; k <= levels; k++) kd[k] = (double)k;
    double *out = v[6].buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < windows; i++) out[i] = kl_window(v[0].buf, v[1].buf, v[2].buf, v[3].buf, n, starts[i], ends[i], levels, kd, cb, nb);
    Py_END_ALLOW_THREADS
    free(scratch);
    release(v, 7);
    Py_RETURN_NONE;
}

/* The noise of every pair (lo edge a, hi[j]) into `row`, as range_selection._noise_two_sided
   computes it (same operations, same order), and the least of them. Per column: H, the edge as
   a double; C_hi, the count below it; above, its clip noise above it. */
CLONES static double noise_row(const double *C, const double *S1, const double *S2, int64_t a, const double *restrict H, const double *restrict C_hi, const double *restrict above, Py_ssize_t cols, double gamma, double rounding_noise, double *restrict row) {
    const double L = (double)a;
    double below = S2[a] - 2 * L * S1[a] + L * L * C[a];
    below = below > 0.0 ? below : 0.0;
    const double C_lo = C[a];
    double least = INFINITY;
#pragma omp simd reduction(min : least)
    for (Py_ssize_t j = 0; j < cols; j++) {
        const double rounding = (C_hi[j] - C_lo) * ((H[j] - L) * (H[j] - L)) * rounding_noise;
        row[j] = gamma * (below + above[j]) + rounding;
        least = row[j] < least ? row[j] : least;
    }
    return least;
}

/* min_noise(C, S1, S2, lo, hi, gamma, rounding_noise) -> (i, j): the pair of least noise, the
   first in (i, j) order among equals (as numpy's argmin over the whole grid). C, S1, S2: n + 1
   float64 prefix sums of c, c x, c x^2; lo, hi: non-empty int64 edge indices in [0, n];
   rounding_noise: range_selection.ROUNDING_NOISE. */
static PyObject *min_noise(PyObject *self, PyObject *args) {
    PyObject *objs[5];
    double gamma, rounding_noise;
    Py_buffer v[5];
    if (!PyArg_ParseTuple(args, "OOOOOdd", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &gamma, &rounding_noise)) return NULL;
    if (get_views(objs, v, 5, 0) < 0) return NULL;
    const Py_ssize_t size = v[0].len / 8, rows = v[3].len / 8, cols = v[4].len / 8;
    int ok = rows > 0 && cols > 0 && size > 0 && is_int64(&v[3]) && is_int64(&v[4]);
    for (int i = 0; i < 3; i++) ok &= is_format(&v[i], 'd', 8) && v[i].len / 8 == size;
    if (!ok) return fail(v, 5, "min_noise() takes three float64 prefix sums of one length, non-empty int64 lo and hi edge indices, gamma and the rounding-noise factor");
    const double *C = v[0].buf, *S1 = v[1].buf, *S2 = v[2].buf;
    const int64_t *lo = v[3].buf, *hi = v[4].buf;
    for (Py_ssize_t i = 0; i < rows; i++)
        if (lo[i] < 0 || lo[i] >= size) return fail(v, 5, "min_noise(): an edge index lies outside the prefix sums");
    for (Py_ssize_t j = 0; j < cols; j++)
        if (hi[j] < 0 || hi[j] >= size) return fail(v, 5, "min_noise(): an edge index lies outside the prefix sums");
    double *scratch = malloc(4 * (size_t)cols * sizeof(double));
    if (scratch == NULL) {
        release(v, 5);
        return PyErr_NoMemory();
    }
    double *above = scratch, *row = scratch + cols, *H = scratch + 2 * cols, *C_hi = scratch + 3 * cols;
    Py_ssize_t best_i = 0, best_j = 0;
    Py_BEGIN_ALLOW_THREADS
    const double Cn = C[size - 1], S1n = S1[size - 1], S2n = S2[size - 1];
    for (Py_ssize_t j = 0; j < cols; j++) {
        H[j] = (double)hi[j], C_hi[j] = C[hi[j]];
        const double b = (S2n - S2[hi[j]]) - 2 * H[j] * (S1n - S1[hi[j]]) + H[j] * H[j] * (Cn - C_hi[j]);
        above[j] = b > 0.0 ? b : 0.0;
    }
    double best = INFINITY;
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (!(noise_row(C, S1, S2, lo[i], H, C_hi, above, cols, gamma, rounding_noise, row) < best)) continue;
        for (Py_ssize_t j = 0; j < cols; j++) /* the row holds a new least: its first column */
            if (row[j] < best) best = row[j], best_i = i, best_j = j;
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    release(v, 5);
    return Py_BuildValue("nn", best_i, best_j);
}

static PyMethodDef methods[] = {
    {"kl_windows", kl_windows, METH_VARARGS, "kl_windows(c, C, PL, NZ, starts, ends, levels, out): KL of each window"},
    {"min_noise", min_noise, METH_VARARGS, "min_noise(C, S1, S2, lo, hi, gamma, rounding_noise) -> (i, j) of least noise"},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_search", "Range-search kernels (see range_selection).", -1, methods};
PyMODINIT_FUNC PyInit__search(void) {
    fill_log_table();
    return PyModule_Create(&module);
}
