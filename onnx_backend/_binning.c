/* Histogram binning kernel of onnx_backend.statistics: counts of x in bins of width 2**exponent,
 * bin k covering [k * 2**exponent, (k + 1) * 2**exponent).
 *
 * Hand-written because binning is most of a calibration pass and numpy cannot do it in one pass:
 * scale, floor, convert and np.bincount (which scans for the minimum and maximum first) cost
 * 1.9-2.9 ns a value with min() and max(); this costs 0.55-0.75, its min and max included
 * (docs/bench/binning.md, `python -m bench.binning`). numba compiled the loop as fast as gcc did
 * before its conversions were vectorized, but importing and loading it costs 0.5 s per process,
 * more than a whole calibration of a small model (bench/onnx_path.py). The numpy path in statistics.py stays as the fallback and as the
 * reference the tests hold this kernel to (tests/test_statistics.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define TILE 4096 /* values converted to bin indices at a time: the indices stay in L1 */
#define SPAN ((Py_ssize_t)1 << 31) /* values counted between flushes: no 32-bit lane overflows */
#define LANES 4   /* interleaved copies of the counts: runs of equal values (the zeros after a
                     ReLU) would otherwise wait on one counter's previous increment */

/* x86-64 Linux: one clone per instruction set, picked when the module loads (packed floor and
   float-to-int conversion need SSE4.1 or later; baseline x86-64 code is 2-3x slower). */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "sse4.1", "default")))
#else
#define CLONES
#endif

/* Bin index of v: floor(v * w) - first, w = 2**-exponent. Scaling by a power of two is exact
   unless it underflows (a negative v whose v * w rounds to 0 lies in bin -1: `underflow` says the
   exponent is positive, the only case where that can happen), and floor(v * w) - first is exact
   in the data's own precision (either every value is small, or all lie within a factor of two of
   `first`), so only the final, small index is converted to an integer. Values below `lower` count
   as `lower` (0 bins max(x, 0), a Relu's output, straight from its input; -inf bins x as it is).
   Mask values (|v| >= `mask`, infinities included: statistics.MASK_MAGNITUDE) are counted in
   *n_low / *n_high and neither binned nor taken into the minimum and maximum: their index is the
   spare slot `nbins`, which is never added into the counts. Each tile's minimum and maximum are
   taken in the same pass over it (no separate min() and max() passes over the data).
   Returns -1, with the counts partial, at the first tile holding NaN or a value outside the bins;
   0 with *lo, *hi (inf, -inf if every value was a mask value) set otherwise. */
#define COUNT_BODY(T)                                                                         \
    int32_t idx[TILE];                                                                        \
    const T first_t = (T)first, inf = (T)INFINITY;                                            \
    T least = inf, most = -inf;                                                               \
    int64_t low = 0, high = 0;                                                                \
    for (Py_ssize_t s = 0; s < n; s += TILE) {                                                \
        const Py_ssize_t m = n - s < TILE ? n - s : TILE;                                     \
        const T *p = x + s;                                                                   \
        T tile_least = inf, tile_most = -inf;                                                 \
        uint32_t outside = 0; /* the caller may not know the range: every tile is checked */  \
        _Pragma("omp simd reduction(min : tile_least) reduction(max : tile_most) reduction(| : outside)") \
        for (Py_ssize_t i = 0; i < m; i++) {                                                  \
            const T u = p[i] > lower ? p[i] : lower;                                          \
            tile_least = u < tile_least ? u : tile_least;                                     \
            tile_most = u > tile_most ? u : tile_most;                                        \
            outside |= p[i] != p[i]; /* NaN */                                                \
        }                                                                                     \
        if (outside) return -1;                                                               \
        if (tile_least > -mask && tile_most < mask) { /* no mask value: the tight loops */    \
            least = tile_least < least ? tile_least : least;                                  \
            most = tile_most > most ? tile_most : most;                                       \
            if (underflow) {                                                                  \
                for (Py_ssize_t i = 0; i < m; i++) {                                          \
                    const T u = p[i] > lower ? p[i] : lower, v = u * w;                       \
                    idx[i] = (int32_t)(FLOOR(v) - first_t) - ((v == 0) & (u < 0));           \
                }                                                                             \
            } else {                                                                          \
                for (Py_ssize_t i = 0; i < m; i++) idx[i] = (int32_t)(FLOOR((p[i] > lower ? p[i] : lower) * w) - first_t); \
            }                                                                                 \
            for (Py_ssize_t i = 0; i < m; i++) outside |= (uint32_t)idx[i] >= (uint32_t)nbins; \
        } else { /* mask values to the spare slot, counted, out of the minimum and maximum */ \
            uint32_t tile_low = 0, tile_high = 0;                                             \
            _Pragma("omp simd reduction(min : least) reduction(max : most) reduction(| : outside) reduction(+ : tile_low, tile_high)") \
            for (Py_ssize_t i = 0; i < m; i++) {                                              \
                const T u = p[i] > lower ? p[i] : lower;                                      \
                const uint32_t is_low = u <= -mask, is_high = u >= mask, masked = is_low | is_high; \
                const T v = (masked ? (T)0 : u) * w;                                          \
                const int32_t k = (int32_t)(FLOOR(v) - first_t) - (underflow & (v == 0) & (u < 0)); \
                const T for_least = masked ? inf : u, for_most = masked ? -inf : u;           \
                outside |= !masked & ((uint32_t)k >= (uint32_t)nbins);                        \
                idx[i] = masked ? (int32_t)nbins : k;                                         \
                tile_low += is_low, tile_high += is_high;                                     \
                least = for_least < least ? for_least : least;                                \
                most = for_most > most ? for_most : most;                                     \
            }                                                                                 \
            low += tile_low, high += tile_high;                                               \
        }                                                                                     \
        if (outside) return -1;                                                               \
        Py_ssize_t j = 0;                                                                     \
        for (; j + LANES <= m; j += LANES) {                                                  \
            lane[0][idx[j]]++;                                                                \
            lane[1][idx[j + 1]]++;                                                            \
            lane[2][idx[j + 2]]++;                                                            \
            lane[3][idx[j + 3]]++;                                                            \
        }                                                                                     \
        for (; j < m; j++) lane[0][idx[j]]++;                                                 \
    }                                                                                         \
    *lo = least, *hi = most, *n_low = low, *n_high = high;                                    \
    return 0;

#define FLOOR floorf
CLONES static int count_f32(const float *x, Py_ssize_t n, float w, float lower, float mask, int64_t first, int underflow, uint32_t **lane, Py_ssize_t nbins, double *lo, double *hi, int64_t *n_low, int64_t *n_high) { COUNT_BODY(float) }
#undef FLOOR
#define FLOOR floor
CLONES static int count_f64(const double *x, Py_ssize_t n, double w, double lower, double mask, int64_t first, int underflow, uint32_t **lane, Py_ssize_t nbins, double *lo, double *hi, int64_t *n_low, int64_t *n_high) { COUNT_BODY(double) }
#undef FLOOR

static int is_format(const Py_buffer *b, char code, Py_ssize_t itemsize) {
    const char *f = b->format ? b->format : "B";
    if (f[0] == '=' || f[0] == '@') f++;
    return b->itemsize == itemsize && f[0] == code && f[1] == 0;
}

/* count(x, w, first, underflow, counts[, relu[, mask]]) -> (min, max, low, high): adds the bin
   counts of x to `counts`, a C-contiguous int64 array whose index 0 is bin `first`, leaving out
   mask values (|x| >= mask, default inf: the infinities only), of which `low` were negative and
   `high` positive; min and max are those of the values counted. x: a non-empty, C-contiguous
   float32 or float64 array; with relu, max(x, 0) instead. None if a value lies outside those bins
   or x holds NaN: `counts` is then partly updated (every tile is checked before it is counted),
   so a caller that does not know x's range passes a copy. */
static PyObject *count(PyObject *self, PyObject *args) {
    PyObject *x_obj, *counts_obj;
    double w, mask = INFINITY;
    long long first;
    int underflow, relu = 0, status = 0;
    Py_buffer x, out;
    if (!PyArg_ParseTuple(args, "OdLpO|pd", &x_obj, &w, &first, &underflow, &counts_obj, &relu, &mask)) return NULL;
    if (PyObject_GetBuffer(x_obj, &x, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(counts_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    const Py_ssize_t nbins = out.len / (Py_ssize_t)sizeof(int64_t), n = x.len / (x.itemsize ? x.itemsize : 1);
    const int f32 = is_format(&x, 'f', 4), f64 = is_format(&x, 'd', 8);
    const int counts_ok = (is_format(&out, 'q', 8) || is_format(&out, 'l', 8)) && nbins >= 1 && nbins <= INT32_MAX;
    if (!(f32 || f64) || n < 1 || !counts_ok) {
        PyBuffer_Release(&x);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "count() takes a non-empty native float32 or float64 array and a native int64 counts array");
        return NULL;
    }
    /* Four lanes of 32-bit counters (half the cache of 64-bit ones; 10 % faster), added into
       `counts` after every SPAN values, before any can overflow; slot nbins of each takes the
       mask values and is never read. */
    const Py_ssize_t slots = nbins + 1;
    uint32_t *scratch = calloc((size_t)LANES * (size_t)slots, sizeof(uint32_t));
    if (scratch == NULL) {
        PyBuffer_Release(&x);
        PyBuffer_Release(&out);
        return PyErr_NoMemory();
    }
    uint32_t *lane[LANES] = {scratch, scratch + slots, scratch + 2 * slots, scratch + 3 * slots};
    int64_t *counts = (int64_t *)out.buf;
    double lo = INFINITY, hi = -INFINITY;
    long long low = 0, high = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = 0; s < n && status == 0; s += SPAN) {
        const Py_ssize_t m = n - s < SPAN ? n - s : SPAN;
        double span_lo, span_hi;
        int64_t span_low, span_high;
        if (f32)
            status = count_f32((const float *)x.buf + s, m, (float)w, relu ? 0.0f : -INFINITY, (float)mask, first, underflow, lane, nbins, &span_lo, &span_hi, &span_low, &span_high);
        else
            status = count_f64((const double *)x.buf + s, m, w, relu ? 0.0 : -INFINITY, mask, first, underflow, lane, nbins, &span_lo, &span_hi, &span_low, &span_high);
        if (status == 0) {
            lo = span_lo < lo ? span_lo : lo, hi = span_hi > hi ? span_hi : hi;
            low += span_low, high += span_high;
            for (Py_ssize_t k = 0; k < nbins; k++) {
                counts[k] += (int64_t)lane[0][k] + lane[1][k] + lane[2][k] + lane[3][k];
                lane[0][k] = lane[1][k] = lane[2][k] = lane[3][k] = 0;
            }
        }
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    if (status < 0) Py_RETURN_NONE;
    return Py_BuildValue("ddLL", lo, hi, low, high);
}

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS, "count(x, w, first, underflow, counts[, relu[, mask]]) -> (min, max, mask values low, high), or None if x does not fit the bins or holds NaN"},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_binning", "Histogram binning kernel (see statistics.bin_batch).", -1, methods};
/* ABI 2: count() takes `mask` and returns the mask values' counts (statistics.BINNING_ABI). */
PyMODINIT_FUNC PyInit__binning(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
