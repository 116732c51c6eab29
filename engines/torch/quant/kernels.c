/* Block-quantized matmuls for x86-64 with AVX2 + FMA: y[M, N] = x[M, K] @ W[N, K]^T, W kept in
 * GGUF's blocks of 32 weights along K (no float copy of W is made), x quantized per block of 32
 * to 8 bits on the fly, dot products in integers (the way llama.cpp runs GGUF files on CPUs):
 *
 *   Q4_1 weights: w = d * q + m, q in 0..15; a row holds K/2 bytes, block b's byte j carries element
 *                 32b + j in its low nibble and element 32b + j + 16 in its high nibble (GGUF order);
 *                 d, m: float32 [N, K/32].
 *   Q8_0 weights: w = d * q, q in -127..127 (int8); a row holds K bytes; d: float32 [N, K/32].
 *   activations:  x = dx * xq, xq in -127..127, dx = max|x| / 127 per block of 32 (round to nearest);
 *                 sx = dx * sum(xq) per block (the Q4_1 min term's factor).
 *
 * Per block: sum_j w_j x_j = d dx sum_j q_j xq_j (+ m sx for Q4_1). 32 products per vpmaddubsw.
 * Each output column reads its weight row once per chunk of up to CHUNK rows of x and applies it to
 * TILE rows at a time, the row staying in L1 across the tiles. Columns are split across OpenMP threads
 * (the process's OpenMP runtime: torch's, already loaded).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define QK 32
#define TILE 4
#define CHUNK 64 /* rows of x per pass over the weights: 64 * K bytes of xq stay in L2 */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* xq[M, K] int8, dx[M, K/32] and sx[M, K/32] float32 from x[M, K] float32. */
void tr_quantize_q8(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *sx) {
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
        float d = max / 127.0f;
        __m256 inv = _mm256_set1_ps(max != 0.0f ? 127.0f / max : 0.0f);
        __m256i i32[4];
        for (int j = 0; j < 4; j++)
            i32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv)); /* round to nearest even */
        /* pack 32 int32 -> 32 int8 in order (packs work per 128-bit lane: fix the order after) */
        __m256i s16a = _mm256_packs_epi32(i32[0], i32[1]), s16b = _mm256_packs_epi32(i32[2], i32[3]);
        __m256i s8 = _mm256_packs_epi16(s16a, s16b);
        s8 = _mm256_permutevar8x32_epi32(s8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + i * QK), s8);
        __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
        dx[i] = d;
        sx[i] = d * (float)_mm_cvtsi128_si32(s);
    }
}

/* The 32 4-bit weights of a block as 32 unsigned bytes in element order. */
static inline __m256i unpack_q4(const uint8_t *q) {
    __m128i bytes = _mm_loadu_si128((const __m128i *)q);
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(bytes, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

/* 8 int32 partial sums of u8 * s8 products (each pair of int16 products fits: 2 * 255 * 127). */
static inline __m256 dot_u8s8(__m256i u, __m256i s) {
    __m256i p16 = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

#define DEFINE_TILE(R)                                                                               \
    static inline void q4_1_tile_##R(const int8_t *xq, const float *dx, const float *sx, int64_t K,   \
                                     const uint8_t *q, const float *d, const float *m, int64_t nb,    \
                                     float *y, int64_t ldy) {                                         \
        __m256 acc[R];                                                                                \
        float mins[R];                                                                                \
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), mins[r] = 0.0f;                     \
        for (int64_t b = 0; b < nb; b++) {                                                            \
            __m256i w = unpack_q4(q + b * (QK / 2));                                                  \
            for (int r = 0; r < R; r++) {                                                             \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + b * QK));              \
                acc[r] = _mm256_fmadd_ps(dot_u8s8(w, xv), _mm256_set1_ps(d[b] * dx[r * nb + b]), acc[r]); \
                mins[r] += m[b] * sx[r * nb + b];                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < R; r++) y[r * ldy] = hsum(acc[r]) + mins[r];                              \
    }                                                                                                 \
    static inline void q8_0_tile_##R(const int8_t *xq, const float *dx, int64_t K, const int8_t *q,   \
                                     const float *d, int64_t nb, float *y, int64_t ldy) {             \
        __m256 acc[R];                                                                                \
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                     \
        for (int64_t b = 0; b < nb; b++) {                                                            \
            __m256i w = _mm256_loadu_si256((const __m256i *)(q + b * QK));                            \
            __m256i wabs = _mm256_sign_epi8(w, w);                                                    \
            for (int r = 0; r < R; r++) {                                                             \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + b * QK));              \
                acc[r] = _mm256_fmadd_ps(dot_u8s8(wabs, _mm256_sign_epi8(xv, w)),                     \
                                         _mm256_set1_ps(d[b] * dx[r * nb + b]), acc[r]);              \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < R; r++) y[r * ldy] = hsum(acc[r]);                                        \
    }

DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)

/* y[M, N] (row stride N) from quantized activations (tr_quantize_q8) and Q4_1 weights. */
void tr_q4_1_matmul(const int8_t *xq, const float *dx, const float *sx, int64_t M, int64_t K,
                    const uint8_t *qs, const float *d, const float *m, int64_t N, float *y) {
    int64_t nb = K / QK;
    for (int64_t c0 = 0; c0 < M; c0 += CHUNK) {
        int64_t c1 = M - c0 < CHUNK ? M : c0 + CHUNK;
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *q = qs + n * (K / 2);
            const float *dn = d + n * nb, *mn = m + n * nb;
            for (int64_t r0 = c0; r0 < c1; r0 += TILE) {
                const int8_t *xr = xq + r0 * K;
                const float *dr = dx + r0 * nb, *sr = sx + r0 * nb;
                float *yr = y + r0 * N + n;
                switch (c1 - r0 < TILE ? c1 - r0 : TILE) {
                case 1: q4_1_tile_1(xr, dr, sr, K, q, dn, mn, nb, yr, N); break;
                case 2: q4_1_tile_2(xr, dr, sr, K, q, dn, mn, nb, yr, N); break;
                case 3: q4_1_tile_3(xr, dr, sr, K, q, dn, mn, nb, yr, N); break;
                default: q4_1_tile_4(xr, dr, sr, K, q, dn, mn, nb, yr, N); break;
                }
            }
        }
    }
}

/* y[M, N] (row stride N) from quantized activations and Q8_0 weights. */
void tr_q8_0_matmul(const int8_t *xq, const float *dx, int64_t M, int64_t K, const int8_t *qs,
                    const float *d, int64_t N, float *y) {
    int64_t nb = K / QK;
    for (int64_t c0 = 0; c0 < M; c0 += CHUNK) {
        int64_t c1 = M - c0 < CHUNK ? M : c0 + CHUNK;
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const int8_t *q = qs + n * K;
            const float *dn = d + n * nb;
            for (int64_t r0 = c0; r0 < c1; r0 += TILE) {
                const int8_t *xr = xq + r0 * K;
                const float *dr = dx + r0 * nb;
                float *yr = y + r0 * N + n;
                switch (c1 - r0 < TILE ? c1 - r0 : TILE) {
                case 1: q8_0_tile_1(xr, dr, K, q, dn, nb, yr, N); break;
                case 2: q8_0_tile_2(xr, dr, K, q, dn, nb, yr, N); break;
                case 3: q8_0_tile_3(xr, dr, K, q, dn, nb, yr, N); break;
                default: q8_0_tile_4(xr, dr, K, q, dn, nb, yr, N); break;
                }
            }
        }
    }
}
