/* The small float32 operations of a decoder step on x86-64 with AVX2 + FMA, one call each instead of
 * several torch operators (at a few tokens per step their fixed costs, not arithmetic, dominate):
 *
 *   tr_rms_norm          out = x * rsqrt(mean(x^2) + eps) * w, row by row
 *   tr_add_rms_norm      x += r (the residual stream, in place), then out = rms_norm(x)
 *   tr_silu_mul          out = silu(gate) * up from the fused [gate | up] projection
 *   tr_rope_store_kv     rotary embedding of q and k from the fused [q | k | v] projection, k and v
 *                        written to their cache slots
 *   tr_paged_attention   query rows, each against positions [0, its context length) of the paged
 *                        K/V cache through its block table (a prefill token: its position + 1)
 *
 * Rows (or, for attention with few rows, KV heads) are split across OpenMP threads when there are
 * enough of them.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for x <= 0 (softmax after subtracting the max): x = n ln2 + r, |r| <= ln2 / 2, e^r by its
 * Taylor polynomial to r^7 (relative error below 2e-7), 2^n from the exponent bits. */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* One row; H a multiple of 8. */
static inline void rms_row(const float *x, int64_t H, const float *w, float eps, float *out) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= H; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(b, b, s1);
    }
    for (; i < H; i += 8) {
        __m256 a = _mm256_loadu_ps(x + i);
        s0 = _mm256_fmadd_ps(a, a, s0);
    }
    __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum(_mm256_add_ps(s0, s1)) / (float)H + eps));
    for (i = 0; i < H; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv), _mm256_loadu_ps(w + i)));
}

void tr_rms_norm(const float *x, int64_t T, int64_t H, const float *w, float eps, float *out) {
#pragma omp parallel for schedule(static) if (T * H >= 65536)
    for (int64_t t = 0; t < T; t++) rms_row(x + t * H, H, w, eps, out + t * H);
}

void tr_add_rms_norm(float *x, const float *r, int64_t T, int64_t H, const float *w, float eps, float *out) {
#pragma omp parallel for schedule(static) if (T * H >= 65536)
    for (int64_t t = 0; t < T; t++) {
        float *xr = x + t * H;
        const float *rr = r + t * H;
        for (int64_t i = 0; i < H; i += 8)
            _mm256_storeu_ps(xr + i, _mm256_add_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(rr + i)));
        rms_row(xr, H, w, eps, out + t * H);
    }
}

/* out[T, I] = silu(gu[T, :I]) * gu[T, I:], I a multiple of 8; silu(x) = x * sigmoid(x), with
 * sigmoid from e = e^-|x| (never overflows): 1 / (1 + e) for x >= 0, e / (1 + e) below. */
void tr_silu_mul(const float *gu, int64_t T, int64_t I, float *out) {
#pragma omp parallel for schedule(static) if (T * I >= 65536)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
        for (int64_t i = 0; i < I; i += 8) {
            __m256 x = _mm256_loadu_ps(g + i);
            __m256 e = exp_nonpositive(_mm256_or_ps(x, sign)); /* e^-|x| */
            __m256 num = _mm256_blendv_ps(one, e, x);          /* x's sign bit picks e */
            __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
        }
    }
}

/* x * cos + rotate_half(x) * sin for one head, rotate_half(x) = [-x2 | x1] with the sign folded into
 * sin_folded = [-sin | sin]: the same multiplies and add as the torch form, so the same floats. */
static inline void rope_head(const float *x, const float *cos, const float *sin_folded, int64_t dim, float *out) {
    int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i += 8) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + half + i);
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(cos + i)),
                                                _mm256_mul_ps(b, _mm256_loadu_ps(sin_folded + i))));
        _mm256_storeu_ps(out + half + i, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(cos + half + i)),
                                                       _mm256_mul_ps(a, _mm256_loadu_ps(sin_folded + half + i))));
    }
}

/* qkv [T, (heads + 2 kv_heads) * dim]; cos, sin_folded [T, dim]; slots [T] (block * block_size +
 * offset); kv [2, slots, kv_heads, dim] with `plane` floats from K to V. Writes q_out [T, heads, dim]
 * and the step's K/V. dim a multiple of 16. */
void tr_rope_store_kv(const float *qkv, int64_t T, int64_t heads, int64_t kv_heads, int64_t dim,
                      const float *cos, const float *sin_folded, const int64_t *slots, float *kv, int64_t plane,
                      float *q_out) {
    int64_t width = (heads + 2 * kv_heads) * dim;
#pragma omp parallel for schedule(static) if (T * width >= 65536)
    for (int64_t t = 0; t < T; t++) {
        const float *row = qkv + t * width, *c = cos + t * dim, *s = sin_folded + t * dim;
        for (int64_t h = 0; h < heads; h++) rope_head(row + h * dim, c, s, dim, q_out + (t * heads + h) * dim);
        float *k = kv + slots[t] * kv_heads * dim, *v = k + plane;
        for (int64_t h = 0; h < kv_heads; h++) {
            rope_head(row + (heads + h) * dim, c, s, dim, k + h * dim);
            const float *vs = row + (heads + kv_heads + h) * dim;
            for (int64_t i = 0; i < dim; i += 8) _mm256_storeu_ps(v + h * dim + i, _mm256_loadu_ps(vs + i));
        }
    }
}

/* Rows [0, n) of a block, `width` floats each from `rows`, into the cache (L1 or, T1, L2) ahead of use. */
static inline void prefetch_rows(const float *rows, int64_t n, int64_t row_stride, int64_t width, int hint) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < width; i += 16) {
            if (hint == _MM_HINT_T0) _mm_prefetch((const char *)(rows + j * row_stride + i), _MM_HINT_T0);
            else _mm_prefetch((const char *)(rows + j * row_stride + i), _MM_HINT_T1);
        }
}

/* q . k for eight keys k0..k7 at once (eight FMA chains, one load of q for eight keys), as one vector
 * of eight sums. */
static inline __m256 dot8(const float *q, const float *k, int64_t row_stride, int64_t dim) {
    __m256 a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < dim; i += 8) {
        __m256 qv = _mm256_loadu_ps(q + i);
        for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * row_stride + i), a[j]);
    }
    /* [k0..k3 | k0..k3] halves and [k4..k7 | k4..k7] halves, then the halves added */
    __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

/* q . k for four keys k0..k3 at once, as one vector of four sums (one horizontal reduction for four). */
static inline __m128 dot4(const float *q, const float *k, int64_t row_stride, int64_t dim) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < dim; i += 8) {
        __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + row_stride + i), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * row_stride + i), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * row_stride + i), a3);
    }
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3)); /* [k0..k3 low | high] */
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

static inline float dot1(const float *q, const float *k, int64_t dim) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0; /* two chains: half the FMA latency per dot */
    for (int64_t i = 0; i < dim; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + i + 8), a1);
    }
    return hsum(_mm256_add_ps(a0, a1));
}

/* Query heads [h0, h0 + n) of a row (q: [n, dim]) against positions [0, ctx) of its K, block by
 * block: the block's rows of the KV heads they read (`kv0` on, `width` floats) are fetched once, the
 * next block's meanwhile, and the block's V rows into L2 for the value pass. scores[g * ld + p] =
 * q_g . k_p * scale, with k_p of KV head (h0 + g) / group. */
static void head_scores(const float *q, int64_t h0, int64_t n, int64_t group, const float *kv, int64_t kv0, int64_t width,
                        int64_t vplane, const int64_t *table, int64_t ctx, int64_t block_size, int64_t row_stride,
                        int64_t dim, float scale, float *scores, int64_t ld) {
    const __m128 sc = _mm_set1_ps(scale);
    const __m256 sc8 = _mm256_set1_ps(scale);
    for (int64_t p0 = 0; p0 < ctx; p0 += block_size) {
        const float *kb = kv + table[p0 / block_size] * block_size * row_stride;
        int64_t end = ctx - p0 < block_size ? ctx - p0 : block_size, next = ctx - p0 - end;
        if (next > 0)
            prefetch_rows(kv + table[p0 / block_size + 1] * block_size * row_stride + kv0 * dim,
                          next < block_size ? next : block_size, row_stride, width, _MM_HINT_T0);
        prefetch_rows(kb + vplane + kv0 * dim, end, row_stride, width, _MM_HINT_T1);
        for (int64_t g = 0; g < n; g++) {
            const float *qg = q + g * dim, *kh = kb + (h0 + g) / group * dim;
            float *out = scores + g * ld + p0;
            int64_t j = 0;
            for (; j + 8 <= end; j += 8)
                _mm256_storeu_ps(out + j, _mm256_mul_ps(dot8(qg, kh + j * row_stride, row_stride, dim), sc8));
            for (; j + 4 <= end; j += 4) _mm_storeu_ps(out + j, _mm_mul_ps(dot4(qg, kh + j * row_stride, row_stride, dim), sc));
            for (; j < end; j++) out[j] = dot1(qg, kh + j * row_stride, dim) * scale;
        }
    }
}

/* scores[0, ctx) -> e^(score - max) in place (float32); returns their sum. */
static float softmax_numerators(float *sc, int64_t ctx) {
    __m256 mx = _mm256_set1_ps(-INFINITY);
    int64_t p = 0;
    for (; p + 8 <= ctx; p += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sc + p));
    float m = hmax(mx);
    for (; p < ctx; p++) m = sc[p] > m ? sc[p] : m;
    __m256 sum = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
    for (p = 0; p + 8 <= ctx; p += 8) {
        __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sc + p), mv));
        _mm256_storeu_ps(sc + p, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum);
    if (p < ctx) { /* the tail through one padded vector */
        float tail[8];
        for (int j = 0; j < 8; j++) tail[j] = p + j < ctx ? sc[p + j] - m : -87.0f;
        _mm256_storeu_ps(tail, exp_nonpositive(_mm256_loadu_ps(tail)));
        for (int j = 0; p + j < ctx; j++) sc[p + j] = tail[j], total += tail[j];
    }
    return total;
}

/* acc[0, NV * 8) += sum_j weights[j] * v_j over a block's rows j < n (the accumulators in registers
 * for the block: a fixed NV per function, so the compiler keeps them there). */
#define DEFINE_VALUES(NV)                                                                                    \
    static inline void values_##NV(const float *weights, const float *vb, int64_t n, int64_t row_stride,      \
                                   float *acc_out) {                                                         \
        __m256 acc[NV];                                                                                      \
        for (int i = 0; i < NV; i++) acc[i] = _mm256_loadu_ps(acc_out + 8 * i);                              \
        for (int64_t j = 0; j < n; j++) {                                                                    \
            __m256 w = _mm256_set1_ps(weights[j]);                                                           \
            for (int i = 0; i < NV; i++) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vb + j * row_stride + 8 * i), acc[i]); \
        }                                                                                                    \
        for (int i = 0; i < NV; i++) _mm256_storeu_ps(acc_out + 8 * i, acc[i]);                              \
    }
DEFINE_VALUES(8)
DEFINE_VALUES(4)
DEFINE_VALUES(2)

/* out_g[0, dim) = sum_p weights_g[p] * v_p / totals[g] for query heads [h0, h0 + n) (weights_g at
 * weights + g * ld), block by block: while a block's V rows are in L1 every head reads them. */
static void head_values(const float *weights, int64_t ld, const float *totals, int64_t h0, int64_t n, int64_t group,
                        const float *kv, const int64_t *table, int64_t ctx, int64_t block_size, int64_t row_stride,
                        int64_t dim, float *out) {
    for (int64_t i = 0; i < n * dim; i += 8) _mm256_storeu_ps(out + i, _mm256_setzero_ps());
    for (int64_t p0 = 0; p0 < ctx; p0 += block_size) {
        const float *vb = kv + table[p0 / block_size] * block_size * row_stride;
        int64_t end = ctx - p0 < block_size ? ctx - p0 : block_size;
        for (int64_t g = 0; g < n; g++) {
            const float *w = weights + g * ld + p0, *vh = vb + (h0 + g) / group * dim;
            float *o = out + g * dim;
            int64_t i = 0;
            for (; i + 64 <= dim; i += 64) values_8(w, vh + i, end, row_stride, o + i);
            if (i + 32 <= dim) values_4(w, vh + i, end, row_stride, o + i), i += 32;
            if (i < dim) values_2(w, vh + i, end, row_stride, o + i);
        }
    }
    for (int64_t g = 0; g < n; g++) {
        __m256 inv = _mm256_set1_ps(1.0f / totals[g]);
        for (int64_t i = 0; i < dim; i += 8)
            _mm256_storeu_ps(out + g * dim + i, _mm256_mul_ps(_mm256_loadu_ps(out + g * dim + i), inv));
    }
}

/* q [D, heads, dim] -> out [D, heads, dim], D query rows (decode tokens, or prefill tokens each with
 * its own causal context length); kv [2, num_blocks, block_size, kv_heads, dim] (K then V);
 * block_tables [D, table_stride] int64; context_lens [D] int64 (>= 1). dim a multiple of 16, heads a
 * multiple of kv_heads (query head h reads KV head h / (heads / kv_heads)). Softmax in float32 with
 * the running maximum subtracted; positions past a row's length are never read. A task is a row (or,
 * when there are too few rows to keep the threads busy, a KV head of it with its query heads, or one
 * query head), so each K/V row comes from memory once per task, block by block.
 * Returns 0, or -1 when the score scratch cannot be allocated. */
int tr_paged_attention(const float *q, int64_t D, int64_t heads, int64_t kv_heads, int64_t dim,
                       const float *kv, int64_t num_blocks, int64_t block_size, const int64_t *block_tables,
                       int64_t table_stride, const int64_t *context_lens, float scale, float *out) {
    int64_t group = heads / kv_heads, max_ctx = 0, row_stride = kv_heads * dim;
    for (int64_t r = 0; r < D; r++) max_ctx = context_lens[r] > max_ctx ? context_lens[r] : max_ctx;
    int64_t threads = omp_get_max_threads(); /* query heads per task: as many as keeps the threads busy */
    int64_t per_task = D >= 2 * threads ? heads : D * kv_heads >= 2 * threads ? group : 1;
    int64_t tasks_per_row = heads / per_task, ld = max_ctx + 8;
    int64_t plane = num_blocks * block_size * row_stride; /* K -> V */
    int failed = 0;
#pragma omp parallel reduction(| : failed) if (D * tasks_per_row >= 2)
    {
        float *scores = malloc(sizeof(float) * (size_t)(per_task * (ld + 1))), *totals = scores + per_task * ld;
        if (scores == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < D * tasks_per_row; task++) {
                int64_t r = task / tasks_per_row, h0 = task % tasks_per_row * per_task, kv0 = h0 / group;
                int64_t ctx = context_lens[r], width = ((h0 + per_task - 1) / group + 1 - kv0) * dim;
                const int64_t *table = block_tables + r * table_stride;
                head_scores(q + (r * heads + h0) * dim, h0, per_task, group, kv, kv0, width, plane, table, ctx,
                            block_size, row_stride, dim, scale, scores, ld);
                for (int64_t g = 0; g < per_task; g++) totals[g] = softmax_numerators(scores + g * ld, ctx);
                head_values(scores, ld, totals, h0, per_task, group, kv + plane, table, ctx, block_size, row_stride,
                            dim, out + (r * heads + h0) * dim);
            }
            free(scores);
        }
    }
    return failed ? -1 : 0;
}
