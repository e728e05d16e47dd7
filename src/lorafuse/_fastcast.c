/* Vectorised dtype conversions for the numpy kernel (lorafuse/fastcast.py), bit for bit the rounding numpy and
 * ml_dtypes do (to nearest, ties to even) for every non-NaN value; a NaN stays a NaN (its payload may change).
 *
 * Why: numpy's fp32 -> fp16 cast is scalar C in numpy's build (1.8 ns a value here, F16C unused), and the
 * conversions are most of a 16-bit merge's arithmetic. x86-64 with AVX2 and F16C only (checked at run time by
 * available()); elsewhere lorafuse keeps its numpy paths. Every function takes contiguous buffers, converts
 * len(src) / itemsize values and releases the GIL while it runs; the roundings also say whether every output is
 * finite (the merge's overflow and NaN check, in the same pass). The FP environment is set to IEEE (no flush of
 * subnormals) for the conversion and restored.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTCAST_X86 1
#include <immintrin.h>
#define SIMD __attribute__((target("avx2,f16c")))
#else
#define FASTCAST_X86 0
#endif

#if FASTCAST_X86

/* MXCSR with flush-to-zero (bit 15) and denormals-are-zero (bit 6) cleared: torch.set_flush_denormal sets both. */
static unsigned int ieee_mxcsr(void) {
    unsigned int saved = _mm_getcsr();
    _mm_setcsr(saved & ~0x8040u);
    return saved;
}

SIMD static void f16_to_f32(const uint16_t *src, float *dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    if (i < n) {
        uint16_t in[8] = {0};
        float out[8];
        memcpy(in, src + i, (size_t)(n - i) * 2);
        _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)in)));
        memcpy(dst + i, out, (size_t)(n - i) * 4);
    }
}

/* All ones in the lanes whose exponent bits (``mask``) are all set: an Inf or NaN, from overflow in the rounding
 * or a non-finite input. */
SIMD static __m128i nonfinite16(__m128i out, uint16_t mask) {
    __m128i m = _mm_set1_epi16((short)mask);
    return _mm_cmpeq_epi16(_mm_and_si128(out, m), m);
}

/* bf16 rounding on the bits: add 0x7FFF plus the lowest kept bit, keep the top half; a NaN becomes ml_dtypes'
 * quiet NaN (0x7FC0 with its sign). */
SIMD static __m128i bf16_of(__m256 values) {
    __m256i bits = _mm256_castps_si256(values);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(values, values, _CMP_UNORD_Q));
    __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(_mm256_and_si256(bits, _mm256_set1_epi32((int)0x80000000u)), 16),
                                    _mm256_set1_epi32(0x7FC0));
    __m256i out = _mm256_blendv_epi8(rounded, quiet, nan);
    /* 8 x 32-bit lanes holding 16-bit values -> 8 x 16-bit (values fit: no saturation) */
    __m128i lo = _mm256_castsi256_si128(out), hi = _mm256_extracti128_si256(out, 1);
    return _mm_packus_epi32(lo, hi);
}

SIMD static __m128i f16_of(__m256 values) { return _mm256_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT); }

/* fp32 -> fp16 (``bf16`` 0) or bf16 (1), 8 values at a time, the tail through a zero-padded copy (zeros are finite);
 * returns nonzero when every output is finite. */
SIMD static int round_f32(const float *src, uint16_t *dst, Py_ssize_t n, int bf16) {
    const uint16_t exponent = bf16 ? 0x7F80 : 0x7C00;
    Py_ssize_t i = 0;
    __m128i bad = _mm_setzero_si128();
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(src + i);
        __m128i out = bf16 ? bf16_of(v) : f16_of(v);
        bad = _mm_or_si128(bad, nonfinite16(out, exponent));
        _mm_storeu_si128((__m128i *)(dst + i), out);
    }
    if (i < n) {
        float in[8] = {0};
        uint16_t out[8];
        memcpy(in, src + i, (size_t)(n - i) * 4);
        __m256 v = _mm256_loadu_ps(in);
        __m128i rounded = bf16 ? bf16_of(v) : f16_of(v);
        bad = _mm_or_si128(bad, nonfinite16(rounded, exponent));
        _mm_storeu_si128((__m128i *)out, rounded);
        memcpy(dst + i, out, (size_t)(n - i) * 2);
    }
    return _mm_testz_si128(bad, bad);
}

/* bf16 -> f16: the bf16 bits are the top half of an fp32 (exact), rounded once to fp16. */
SIMD static __m256 f32_of_bf16(const uint16_t *src) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

SIMD static void bf16_to_f16(const uint16_t *src, uint16_t *dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(f32_of_bf16(src + i), _MM_FROUND_TO_NEAREST_INT));
    if (i < n) {
        uint16_t in[8] = {0}, out[8];
        memcpy(in, src + i, (size_t)(n - i) * 2);
        _mm_storeu_si128((__m128i *)out, _mm256_cvtps_ph(f32_of_bf16(in), _MM_FROUND_TO_NEAREST_INT));
        memcpy(dst + i, out, (size_t)(n - i) * 2);
    }
}

/* Q8_0 (gguf_quant.py): per block of 32 values d = max|x| / 127 and q = x * (1 / d) rounded half away from zero
 * (adding copysign(0.5 - 2**-25, q) then truncating, as gguf_quant.py does it), stored as fp16 d then 32 int8 q.
 * Returns 0 when a block holds an Inf or NaN or its 1 / d overflows (a tiny scale): the caller takes
 * gguf_quant.py's exact path then (how those become int8 is numpy's and the CPU's). */
SIMD static int q8_0(const float *src, uint8_t *dst, Py_ssize_t blocks) {
    const __m256 sign = _mm256_set1_ps(-0.0f), half_down = _mm256_set1_ps(0.5f - 2.98023224e-08f);
    const __m256 infinity = _mm256_set1_ps(__builtin_inff());
    for (Py_ssize_t b = 0; b < blocks; b++) {
        const float *x = src + b * 32;
        __m256 v[4], m = _mm256_setzero_ps(), nonfinite = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            __m256 magnitude = _mm256_andnot_ps(sign, v[k]);
            m = _mm256_max_ps(m, magnitude);
            nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(magnitude, infinity, _CMP_NLT_UQ));
        }
        if (_mm256_movemask_ps(nonfinite)) return 0;  /* Inf or NaN: gguf_quant.py's own steps decide those */
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        volatile float d = _mm_cvtss_f32(h) / 127.0f;  /* fp32 division, as numpy's */
        float inverse = d == 0.0f ? 0.0f : 1.0f / d;
        if (inverse > 3.40282347e+38f) return 0;
        uint8_t *out = dst + b * 34;
        uint16_t scale = (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(d), _MM_FROUND_TO_NEAREST_INT), 0);
        memcpy(out, &scale, 2);
        __m256 inv = _mm256_set1_ps(inverse);
        __m256i q[4];
        for (int k = 0; k < 4; k++) {
            __m256 scaled = _mm256_mul_ps(v[k], inv);
            __m256 bias = _mm256_or_ps(_mm256_and_ps(scaled, sign), half_down);
            q[k] = _mm256_cvttps_epi32(_mm256_add_ps(scaled, bias));
        }
        /* int32 -> int16 -> int8 (|q| <= 127: no saturation); packs work per 128-bit lane, so put lanes back */
        __m256i w01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
        __m256i w23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
        __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(w01, w23), 0xD8);
        _mm256_storeu_si256((__m256i *)(out + 2), bytes);
    }
    return 1;
}

#endif /* FASTCAST_X86 */

/* Bytes per converted unit: a value, or for Q8_0 a block of 32. */
enum kind { F16_TO_F32, F32_TO_F16, F32_TO_BF16, BF16_TO_F16, F32_TO_Q8_0 };
static const int SRC_SIZE[] = {2, 4, 4, 2, 32 * 4};
static const int DST_SIZE[] = {4, 2, 2, 2, 34};

static PyObject *convert(PyObject *args, enum kind kind) {
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &dst)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = src.len / SRC_SIZE[kind];
    if (src.len % SRC_SIZE[kind] || dst.len != n * DST_SIZE[kind]) {
        PyErr_SetString(PyExc_ValueError, "fastcast: source and destination sizes do not match");
        goto done;
    }
#if FASTCAST_X86
    int finite = 1;
    Py_BEGIN_ALLOW_THREADS
    unsigned int saved = ieee_mxcsr();
    switch (kind) {
        case F16_TO_F32: f16_to_f32((const uint16_t *)src.buf, (float *)dst.buf, n); break;
        case F32_TO_F16: finite = round_f32((const float *)src.buf, (uint16_t *)dst.buf, n, 0); break;
        case F32_TO_BF16: finite = round_f32((const float *)src.buf, (uint16_t *)dst.buf, n, 1); break;
        case BF16_TO_F16: bf16_to_f16((const uint16_t *)src.buf, (uint16_t *)dst.buf, n); break;
        case F32_TO_Q8_0: finite = q8_0((const float *)src.buf, (uint8_t *)dst.buf, n); break;
    }
    _mm_setcsr(saved);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(finite);
#else
    PyErr_SetString(PyExc_RuntimeError, "fastcast: not built for this CPU");
#endif
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *py_f16_to_f32(PyObject *self, PyObject *args) { return convert(args, F16_TO_F32); }
static PyObject *py_f32_to_f16(PyObject *self, PyObject *args) { return convert(args, F32_TO_F16); }
static PyObject *py_f32_to_bf16(PyObject *self, PyObject *args) { return convert(args, F32_TO_BF16); }
static PyObject *py_bf16_to_f16(PyObject *self, PyObject *args) { return convert(args, BF16_TO_F16); }

static PyObject *py_q8_0(PyObject *self, PyObject *args) { return convert(args, F32_TO_Q8_0); }

static PyObject *py_available(PyObject *self, PyObject *unused) {
#if FASTCAST_X86
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"));
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"available", py_available, METH_NOARGS, "True when this CPU runs the conversions (x86-64, AVX2, F16C)."},
    {"f16_to_f32", py_f16_to_f32, METH_VARARGS, "f16_to_f32(src, dst): fp16 bytes -> fp32, exact."},
    {"f32_to_f16", py_f32_to_f16, METH_VARARGS,
     "f32_to_f16(src, dst) -> bool: fp32 -> fp16, to nearest even; False when an output is Inf or NaN."},
    {"f32_to_bf16", py_f32_to_bf16, METH_VARARGS,
     "f32_to_bf16(src, dst) -> bool: fp32 -> bf16, to nearest even; False when an output is Inf or NaN."},
    {"bf16_to_f16", py_bf16_to_f16, METH_VARARGS, "bf16_to_f16(src, dst): bf16 -> fp16, to nearest even."},
    {"q8_0", py_q8_0, METH_VARARGS,
     "q8_0(src, dst) -> bool: fp32 blocks of 32 -> GGUF Q8_0 (34 bytes each); False if a scale is too small."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcast", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastcast(void) { return PyModule_Create(&module); }
