/* Block-quantized matmuls for x86-64 with AVX2 + FMA: y[M, N] = x[M, K] @ W[N, K]^T, W kept in
 * GGUF's blocks of 32 weights along K (no float copy of W is made). Two paths, by the rows of x:
 *
 *   M < FLOAT_MIN_ROWS (small-batch decode: memory-bound): x quantized per block of 32 to 16 bits
 *       on the fly, dot products in integers, 16 products per vpmaddwd.
 *   M >= FLOAT_MIN_ROWS (batched decode, prefill: compute-bound): per chunk of CHUNK rows of x, each
 *       pair of weight rows dequantized exactly into L1, then float32 FMAs, 4 rows of x x 2 columns at
 *       a time. No per-block scales, one FMA per product: measured on Zen 1 (one thread), 4.9 cycles
 *       per 32 products and column against 7.3 for the integer path at 32 rows, and 1.0-1.7x the
 *       speed of dequantizing the whole weight and calling torch's BLAS (MKL) at 64 to 2048 rows.
 *
 * Formats:
 *   Q4_1 weights: w = d * q + m, q in 0..15; a row holds K/2 bytes, block b's byte j carries element
 *                 32b + j in its low nibble and element 32b + j + 16 in its high nibble (GGUF order);
 *                 d, m: float32 [N, K/32].
 *   Q8_0 weights: w = d * q, q in -127..127 (int8); a row holds K bytes; d: float32 [N, K/32].
 *   activations (integer path): x = dx * xq, xq in -32767..32767, dx = max|x| / 32767 per block of 32
 *                 (round to nearest even); sx = dx * sum(xq) per block (the Q4_1 min term's factor).
 *                 The rounding error is at most 2^-16 of the block's largest value. 8-bit activations
 *                 (llama.cpp's choice; same speed on AVX2, whose int8 and int16 multiply-adds
 *                 share a port) moved SmolLM2-135M's logits 4.5 %, enough to flip a near-tie
 *                 answer to French.
 *
 * Integer path per block: sum_j w_j x_j = d dx sum_j q_j xq_j (+ m sx for Q4_1), the integer sum exact
 * in int32 (|q xq| sums stay below 2^31: 32 * 127 * 32767). Each output column's weight row is applied
 * to TILE rows of x at a time, staying in L1 across the tiles. In both paths a row's result does not depend on the other rows of x, and columns
 * are split across OpenMP threads (the process's OpenMP runtime: torch's, already loaded).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32
#define TILE 4
#define CHUNK 64 /* float path: rows of x per pass over the weights (64 x K floats stay in L2) */
#define FLOAT_MIN_ROWS 8 /* rows of x from which the float path is taken (measured: 6.7 vs 7.2 cycles at 8) */

int tr_float_min_rows(void) { return FLOAT_MIN_ROWS; }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* xq[M, K] int16, dx[M, K/32] and sx[M, K/32] float32 from x[M, K] float32. */
void tr_quantize_q16(const float *x, int64_t M, int64_t K, int16_t *xq, float *dx, float *sx) {
    int64_t nb = K / QK;
#pragma omp parallel for schedule(static) if (M * nb >= 4096)
    for (int64_t i = 0; i < M * nb; i++) {
        const float *p = x + i * QK;
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(p + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float max = _mm_cvtss_f32(h);
        float d = max / 32767.0f;
        __m256 inv = _mm256_set1_ps(max != 0.0f ? 32767.0f / max : 0.0f);
        __m256i i32[4];
        for (int j = 0; j < 4; j++)
            i32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv)); /* round to nearest even */
        /* packs work per 128-bit lane: [a0-3 b0-3 | a4-7 b4-7] -> reorder the 64-bit quarters */
        for (int j = 0; j < 4; j += 2) {
            __m256i s16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i32[j], i32[j + 1]), 0xD8);
            _mm256_storeu_si256((__m256i *)(xq + i * QK + 8 * j), s16);
        }
        __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
        dx[i] = d;
        sx[i] = d * (float)_mm_cvtsi128_si32(s);
    }
}

/* A Q4_1 block's 32 nibbles as bytes: elements 0-15 (low nibbles), then 16-31 (high nibbles). */
static inline void q4_nibbles(const uint8_t *q, __m128i half[2]) {
    __m128i bytes = _mm_loadu_si128((const __m128i *)q), mask = _mm_set1_epi8(0x0F);
    half[0] = _mm_and_si128(bytes, mask);
    half[1] = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
}

/* A block's 32 weights as two vectors of 16 int16, elements 0-15 and 16-31. */
static inline void unpack_q4(const uint8_t *q, __m256i w[2]) {
    __m128i half[2];
    q4_nibbles(q, half);
    w[0] = _mm256_cvtepu8_epi16(half[0]);
    w[1] = _mm256_cvtepu8_epi16(half[1]);
}

static inline void unpack_q8(const int8_t *q, __m256i w[2]) {
    w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
    w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
}

/* The block's dot product as 8 float partial sums (exact int32 sums, then converted). */
static inline __m256 block_dot(const __m256i w[2], const int16_t *x) {
    __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256((const __m256i *)x)),
                                 _mm256_madd_epi16(w[1], _mm256_loadu_si256((const __m256i *)(x + 16))));
    return _mm256_cvtepi32_ps(p);
}

#define DEFINE_TILE(R)                                                                               \
    static inline void q4_1_tile_##R(const int16_t *xq, const float *dx, const float *sx, int64_t K,  \
                                     const uint8_t *q, const float *d, const float *m, int64_t nb,    \
                                     float *y, int64_t ldy) {                                         \
        __m256 acc[R];                                                                                \
        float mins[R];                                                                                \
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), mins[r] = 0.0f;                     \
        for (int64_t b = 0; b < nb; b++) {                                                            \
            __m256i w[2];                                                                             \
            unpack_q4(q + b * (QK / 2), w);                                                           \
            for (int r = 0; r < R; r++) {                                                             \
                acc[r] = _mm256_fmadd_ps(block_dot(w, xq + r * K + b * QK),                           \
                                         _mm256_set1_ps(d[b] * dx[r * nb + b]), acc[r]);              \
                mins[r] += m[b] * sx[r * nb + b];                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < R; r++) y[r * ldy] = hsum(acc[r]) + mins[r];                              \
    }                                                                                                 \
    static inline void q8_0_tile_##R(const int16_t *xq, const float *dx, int64_t K, const int8_t *q,  \
                                     const float *d, int64_t nb, float *y, int64_t ldy) {             \
        __m256 acc[R];                                                                                \
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                     \
        for (int64_t b = 0; b < nb; b++) {                                                            \
            __m256i w[2];                                                                             \
            unpack_q8(q + b * QK, w);                                                                 \
            for (int r = 0; r < R; r++)                                                               \
                acc[r] = _mm256_fmadd_ps(block_dot(w, xq + r * K + b * QK),                           \
                                         _mm256_set1_ps(d[b] * dx[r * nb + b]), acc[r]);              \
        }                                                                                             \
        for (int r = 0; r < R; r++) y[r * ldy] = hsum(acc[r]);                                        \
    }

DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)

/* y[M, N] (row stride N) from quantized activations (tr_quantize_q16) and Q4_1 weights. */
static void q4_1_matmul(const int16_t *xq, const float *dx, const float *sx, int64_t M, int64_t K,
                        const uint8_t *qs, const float *d, const float *m, int64_t N, float *y) {
    int64_t nb = K / QK;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *q = qs + n * (K / 2);
        const float *dn = d + n * nb, *mn = m + n * nb;
        for (int64_t r0 = 0; r0 < M; r0 += TILE) {
            const int16_t *xr = xq + r0 * K;
            const float *dr = dx + r0 * nb, *sr = sx + r0 * nb;
            float *yr = y + r0 * N + n;
            switch (M - r0 < TILE ? M - r0 : TILE) {
            case 1: q4_1_tile_1(xr, dr, sr, K, q, dn, mn, nb, yr, N); break;
            case 2: q4_1_tile_2(xr, dr, sr, K, q, dn, mn, nb, yr, N); break;
            case 3: q4_1_tile_3(xr, dr, sr, K, q, dn, mn, nb, yr, N); break;
            default: q4_1_tile_4(xr, dr, sr, K, q, dn, mn, nb, yr, N); break;
            }
        }
    }
}

/* y[M, N] (row stride N) from quantized activations and Q8_0 weights. */
static void q8_0_matmul(const int16_t *xq, const float *dx, int64_t M, int64_t K, const int8_t *qs,
                        const float *d, int64_t N, float *y) {
    int64_t nb = K / QK;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *q = qs + n * K;
        const float *dn = d + n * nb;
        for (int64_t r0 = 0; r0 < M; r0 += TILE) {
            const int16_t *xr = xq + r0 * K;
            const float *dr = dx + r0 * nb;
            float *yr = y + r0 * N + n;
            switch (M - r0 < TILE ? M - r0 : TILE) {
            case 1: q8_0_tile_1(xr, dr, K, q, dn, nb, yr, N); break;
            case 2: q8_0_tile_2(xr, dr, K, q, dn, nb, yr, N); break;
            case 3: q8_0_tile_3(xr, dr, K, q, dn, nb, yr, N); break;
            default: q8_0_tile_4(xr, dr, K, q, dn, nb, yr, N); break;
            }
        }
    }
}

/* One block of 32 weights as float32, bit-identical to the reference dequantization (d * q is exact in
 * float32, so fma(q, d, m) rounds once, as d * q + m does): the float path's weights. */
static inline void dequantize_q4_1_block(const uint8_t *qs, float d, float m, float *w) {
    __m128i half[2];
    q4_nibbles(qs, half);
    __m256 s = _mm256_set1_ps(d), mn = _mm256_set1_ps(m);
    for (int h = 0; h < 2; h++) {
        __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(half[h]));
        __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(half[h], 8)));
        _mm256_storeu_ps(w + 16 * h, _mm256_fmadd_ps(lo, s, mn));
        _mm256_storeu_ps(w + 16 * h + 8, _mm256_fmadd_ps(hi, s, mn));
    }
}

static inline void dequantize_q8_0_block(const int8_t *qs, float d, float *w) {
    __m256 s = _mm256_set1_ps(d);
    for (int j = 0; j < 4; j++) {
        __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * j)));
        _mm256_storeu_ps(w + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s));
    }
}

/* The float path: R rows of x against a pair of dequantized columns, so each load of x feeds two FMAs
 * and each weight load R (8 accumulators for R = 4). Float32 products and sums, as a BLAS on the
 * dequantized weights would do them (only the order of the additions differs). */
#define DEFINE_FLOAT_TILE(R)                                                                    \
    static inline void float_tile_##R(const float *x, int64_t K, const float *w0, const float *w1,     \
                                      float *y, int64_t ldy, int both) {                               \
        __m256 a0[R], a1[R];                                                                           \
        for (int r = 0; r < R; r++) a0[r] = _mm256_setzero_ps(), a1[r] = _mm256_setzero_ps();          \
        for (int64_t k = 0; k < K; k += 8) {                                                           \
            __m256 u = _mm256_load_ps(w0 + k), v = _mm256_load_ps(w1 + k);                             \
            for (int r = 0; r < R; r++) {                                                              \
                __m256 xr = _mm256_loadu_ps(x + r * K + k);                                            \
                __asm__("" : "+x"(xr)); /* one load for both FMAs: gcc folds it into each otherwise */ \
                a0[r] = _mm256_fmadd_ps(xr, u, a0[r]);                                                 \
                a1[r] = _mm256_fmadd_ps(xr, v, a1[r]);                                                 \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < R; r++) {                                                                  \
            y[r * ldy] = hsum(a0[r]);                                                                  \
            if (both) y[r * ldy + 1] = hsum(a1[r]);                                                    \
        }                                                                                              \
    }

DEFINE_FLOAT_TILE(1)
DEFINE_FLOAT_TILE(2)
DEFINE_FLOAT_TILE(3)
DEFINE_FLOAT_TILE(4)

static inline void dequantize_row(const uint8_t *qs, const float *d, const float *m, int64_t K, float *w) {
    int64_t nb = K / QK;
    if (m != NULL)
        for (int64_t b = 0; b < nb; b++) dequantize_q4_1_block(qs + b * (QK / 2), d[b], m[b], w + b * QK);
    else
        for (int64_t b = 0; b < nb; b++) dequantize_q8_0_block((const int8_t *)qs + b * QK, d[b], w + b * QK);
}

/* y[M, N] (row stride N) = x[M, K] @ W^T in float32, W in Q4_1 (m != NULL) or Q8_0 blocks. */
static int float_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qs, const float *d, const float *m,
                        int64_t N, float *y) {
    int64_t nb = K / QK, row_bytes = m != NULL ? K / 2 : K;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *w = aligned_alloc(32, (size_t)(2 * K) * sizeof(float));
        if (w == NULL) failed = 1;
        for (int64_t c0 = 0; c0 < M; c0 += CHUNK) {
            int64_t c1 = M - c0 < CHUNK ? M : c0 + CHUNK;
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n += 2) {
                if (w == NULL) continue;
                int both = n + 1 < N; /* an odd N's last column goes alone (against itself twice) */
                const float *w1 = both ? w + K : w;
                dequantize_row(qs + n * row_bytes, d + n * nb, m != NULL ? m + n * nb : NULL, K, w);
                if (both)
                    dequantize_row(qs + (n + 1) * row_bytes, d + (n + 1) * nb, m != NULL ? m + (n + 1) * nb : NULL, K,
                                   w + K);
                for (int64_t r0 = c0; r0 < c1; r0 += TILE) {
                    const float *xr = x + r0 * K;
                    float *yr = y + r0 * N + n;
                    switch (c1 - r0 < TILE ? c1 - r0 : TILE) {
                    case 1: float_tile_1(xr, K, w, w1, yr, N, both); break;
                    case 2: float_tile_2(xr, K, w, w1, yr, N, both); break;
                    case 3: float_tile_3(xr, K, w, w1, yr, N, both); break;
                    default: float_tile_4(xr, K, w, w1, yr, N, both); break;
                    }
                }
            }
        }
        free(w);
    }
    return failed ? -1 : 0;
}

/* The entry points: y[M, N] = x[M, K] @ W^T, x float32 row-major, one call per linear layer (the
 * activations' scratch is allocated here). Return 0, or -1 when the scratch cannot be allocated. */
static int16_t *scratch(int64_t M, int64_t K, float **dx, float **sx) {
    int64_t nb = K / QK;
    int16_t *xq = malloc((size_t)(M * K) * sizeof(int16_t) + (size_t)(2 * M * nb) * sizeof(float));
    if (xq != NULL) {
        *dx = (float *)(xq + M * K);
        *sx = *dx + M * nb;
    }
    return xq;
}

int tr_q4_1_linear(const float *x, int64_t M, int64_t K, const uint8_t *qs, const float *d, const float *m,
                   int64_t N, float *y) {
    float *dx, *sx;
    if (M == 0) return 0;
    if (M >= FLOAT_MIN_ROWS) return float_matmul(x, M, K, qs, d, m, N, y);
    int16_t *xq = scratch(M, K, &dx, &sx);
    if (xq == NULL) return -1;
    tr_quantize_q16(x, M, K, xq, dx, sx);
    q4_1_matmul(xq, dx, sx, M, K, qs, d, m, N, y);
    free(xq);
    return 0;
}

int tr_q8_0_linear(const float *x, int64_t M, int64_t K, const int8_t *qs, const float *d, int64_t N, float *y) {
    float *dx, *sx;
    if (M == 0) return 0;
    if (M >= FLOAT_MIN_ROWS) return float_matmul(x, M, K, (const uint8_t *)qs, d, NULL, N, y);
    int16_t *xq = scratch(M, K, &dx, &sx);
    if (xq == NULL) return -1;
    tr_quantize_q16(x, M, K, xq, dx, sx);
    q8_0_matmul(xq, dx, M, K, qs, d, N, y);
    free(xq);
    return 0;
}
