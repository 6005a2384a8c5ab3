/* The sparse decoder's kernels for bf16 weights on the CPU, one call per source layer (see kernels.py).
 *
 * decode:   out[t][b] += sum_j val[j] * W[t][feat[j]]                for the entries j of token b (token-major)
 * backward: dots[j]    = sum_t G[t][tok[j]] . W[t][f]                 for the entries j of feature f (feature-major)
 *           dW[t][f]   = sum_j val[j] * G[t][tok[j]]
 * t runs over the source's targets, W[t] is the block [F, d] from the source to its t-th target, G[t] [B, d] the loss
 * gradient of that target's reconstruction. The backward pass reads each gradient row once for both outputs (the
 * PyTorch path reads it twice, in a sampled product and an embedding bag). Accumulation is float32; the threads split
 * the tokens (decode) or features (backward) by their entries, and each walks the targets in order and, within one,
 * bands of columns, so one band of W (decode) or of G (backward) at a time is in cache.
 * error:    out[t][b] += b_dec[t] - y[b][t]                           the reconstruction made the error, in place
 * adam:     one Adam(W) update of a float32 parameter from its bf16 gradient, writing the bf16 compute copy
 * rows:     the sampler's rows normalised (x·scale + bias) into their shuffled places, NaN/Inf rows flagged
 * quantise: rows standardised by the store's reference, one absmax scale per row and layer, coded as int8 or fp8
 * dequantise: the inverse, to bf16, optionally normalised into the sampler's shuffled places (data/quantize.py) */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef uint16_t bf16;

static inline float to_f32(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 to_bf16(float f) { /* round to nearest even, NaN kept */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

/* -- threads: part i of n gets the groups [lo, hi) holding entries [i*nnz/n, (i+1)*nnz/n) of a CSR pointer array.
 * OpenMP here is PyTorch's own libgomp (already loaded, same soname), so the kernels run on the threads that its
 * operators just used, not on a second pool competing with them for the cores. -- */

static inline void thread_of(int *i, int *n) { /* this thread's number and the team's size */
#ifdef _OPENMP
    *i = omp_get_thread_num(), *n = omp_get_num_threads();
#else
    *i = 0, *n = 1;
#endif
}

static int64_t first_group_at(const int64_t *ptr, int64_t groups, int64_t entry) { /* min g with ptr[g] >= entry */
    int64_t lo = 0, hi = groups;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (ptr[mid] < entry) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static void parallel_over(void (*fn)(void *, int64_t, int64_t), void *args, const int64_t *ptr, int64_t groups,
                          int threads) {
    const int64_t nnz = ptr[groups];
    if (threads < 1 || nnz < 4096) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int i, n;
        thread_of(&i, &n);
        const int64_t lo = i == 0 ? 0 : first_group_at(ptr, groups, nnz * i / n);
        const int64_t hi = i == n - 1 ? groups : first_group_at(ptr, groups, nnz * (i + 1) / n);
        fn(args, lo, hi);
    }
}

/* -- decode -------------------------------------------------------------------------------------------------------- */

typedef struct {
    float *out;
    int64_t out_target_stride, out_row_stride;
    const bf16 *W;
    int64_t W_target_stride, targets;
    const int64_t *ptr, *feat;
    const float *val;
    int64_t d;
} decode_args;

#define AHEAD 8 /* entries ahead whose rows are prefetched */

#ifdef __AVX512F__
static inline void prefetch(const bf16 *x, int n) { /* the cache lines of x[0, n) */
    for (int i = 0; i < n; i += 32) _mm_prefetch((const char *)(x + i), _MM_HINT_T0);
}

static inline __m512 widen(const bf16 *x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

/* Columns [i, i + 16·NV) of one token's row: outputs in registers over all its entries. */
#define DECODE_COLUMNS(NV)                                                                              \
    static inline void decode_columns_##NV(float *row, const bf16 *W, const int64_t *feat, const float *val,  \
                                           int64_t start, int64_t end, int64_t last, int64_t i, int64_t d) {  \
        __m512 o[NV];                                                                                   \
        for (int k = 0; k < NV; k++) o[k] = _mm512_loadu_ps(row + i + 16 * k);                          \
        for (int64_t j = start; j < end; j++) {                                                         \
            if (j + AHEAD < last) prefetch(W + feat[j + AHEAD] * d + i, 16 * NV);                        \
            const bf16 *w = W + feat[j] * d + i;                                                        \
            const __m512 v = _mm512_set1_ps(val[j]);                                                    \
            for (int k = 0; k < NV; k++) o[k] = _mm512_fmadd_ps(v, widen(w + 16 * k), o[k]);            \
        }                                                                                               \
        for (int k = 0; k < NV; k++) _mm512_storeu_ps(row + i + 16 * k, o[k]);                          \
    }
DECODE_COLUMNS(8)
DECODE_COLUMNS(1)
#endif

/* One target at a time, and within it one band of 128 columns at a time over all the thread's tokens: the band of W
 * (F rows × 256 bytes, 512 KB at F=2048) stays in L2 while the tokens' rows stream through (~20 % faster than
 * whole rows at the SmolLM2 shape, whose blocks of W are 2.4 MB). */
static void decode_part(void *p, int64_t lo, int64_t hi) {
    const decode_args *a = (const decode_args *)p;
    const int64_t d = a->d, last = a->ptr[hi];
    for (int64_t t = 0; t < a->targets; t++) {
        const bf16 *W = a->W + t * a->W_target_stride;
        float *out = a->out + t * a->out_target_stride;
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i + 128 <= d; i += 128)
            for (int64_t b = lo; b < hi; b++)
                decode_columns_8(out + b * a->out_row_stride, W, a->feat, a->val, a->ptr[b], a->ptr[b + 1], last, i, d);
        for (; i + 16 <= d; i += 16)
            for (int64_t b = lo; b < hi; b++)
                decode_columns_1(out + b * a->out_row_stride, W, a->feat, a->val, a->ptr[b], a->ptr[b + 1], last, i, d);
#endif
        for (int64_t b = lo; b < hi; b++) {
            float *row = out + b * a->out_row_stride;
            for (int64_t c = i; c < d; c++) {
                float o = row[c];
                for (int64_t j = a->ptr[b]; j < a->ptr[b + 1]; j++) o += a->val[j] * to_f32(W[a->feat[j] * d + c]);
                row[c] = o;
            }
        }
    }
}

void clt_decode(float *out, int64_t out_target_stride, int64_t out_row_stride, const bf16 *W, int64_t W_target_stride,
                int64_t targets, const int64_t *ptr, const int64_t *feat, const float *val, int64_t tokens, int64_t d,
                int threads) {
    decode_args a = {out, out_target_stride, out_row_stride, W, W_target_stride, targets, ptr, feat, val, d};
    parallel_over(decode_part, &a, ptr, tokens, threads);
}

/* -- backward ------------------------------------------------------------------------------------------------------ */

typedef struct {
    const bf16 *G;
    int64_t G_target_stride;
    const bf16 *W;
    bf16 *dW;
    int64_t W_target_stride, targets;
    const int64_t *ptr, *tok;
    const float *val;
    float *dots;
    int64_t d;
} backward_args;

#ifdef __AVX512F__
/* Columns [i, i + 16·NV) of one feature: its weights and weight gradient in registers over all its entries. */
#define BACKWARD_COLUMNS(NV)                                                                                 \
    static inline void backward_columns_##NV(const bf16 *G, const bf16 *wf, bf16 *dw, const int64_t *tok,    \
                                             const float *val, float *dots, int64_t start, int64_t end,       \
                                             int64_t last, int64_t i, int64_t d) {                            \
        __m512 w[NV], acc[NV];                                                                               \
        for (int k = 0; k < NV; k++) w[k] = widen(wf + i + 16 * k), acc[k] = _mm512_setzero_ps();            \
        for (int64_t j = start; j < end; j++) {                                                              \
            if (j + AHEAD < last) prefetch(G + tok[j + AHEAD] * d + i, 16 * NV);                             \
            const bf16 *g = G + tok[j] * d + i;                                                              \
            const __m512 v = _mm512_set1_ps(val[j]);                                                         \
            __m512 dot = _mm512_setzero_ps();                                                                \
            for (int k = 0; k < NV; k++) {                                                                   \
                const __m512 x = widen(g + 16 * k);                                                          \
                dot = _mm512_fmadd_ps(x, w[k], dot);                                                         \
                acc[k] = _mm512_fmadd_ps(v, x, acc[k]);                                                      \
            }                                                                                                \
            dots[j] += _mm512_reduce_add_ps(dot);                                                            \
        }                                                                                                    \
        for (int k = 0; k < NV; k++) {                                                                       \
            float tmp[16];                                                                                   \
            _mm512_storeu_ps(tmp, acc[k]);                                                                   \
            for (int e = 0; e < 16; e++) dw[i + 16 * k + e] = to_bf16(tmp[e]);                               \
        }                                                                                                    \
    }
BACKWARD_COLUMNS(8)
BACKWARD_COLUMNS(1)
#endif

#ifdef __AVX512BF16__
/* With AVX512-BF16, two entries at a time through vdpbf16ps (two bf16 products summed into float32 per lane): their
 * dots straight from the bf16 rows, and the weight gradient from their gradient rows interleaved (unpacklo/hi) times
 * the pair of their values rounded to bf16 (dW's error rises from 0.17 % to 0.22 % rms of a float64 reference, against
 * 0.17 % for rounding dW to bf16 itself), the accumulators in the order unpack leaves the columns. ~30 % faster than
 * the float32 FMAs at the SmolLM2 shape. */
static inline __m512i pair_of(float a, float b) { /* (a, b) rounded to bf16, in every 32-bit lane */
    return _mm512_set1_epi32((int)((uint32_t)to_bf16(b) << 16 | to_bf16(a)));
}
static const int32_t FROM_0[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
static const int32_t FROM_1[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
#define DOT(acc, x, y) _mm512_dpbf16_ps(acc, (__m512bh)(x), (__m512bh)(y))
static inline void backward_pairs_4(const bf16 *G, const bf16 *wf, bf16 *dw, const int64_t *tok, const float *val,
                                    float *dots, int64_t start, int64_t end, int64_t last, int64_t i, int64_t d) {
    __m512i w[4];
    __m512 lo[4], hi[4];
    for (int k = 0; k < 4; k++) w[k] = _mm512_loadu_si512(wf + i + 32 * k), lo[k] = hi[k] = _mm512_setzero_ps();
    for (int64_t j = start; j < end; j += 2) {
        const int64_t j2 = j + 1 < end ? j + 1 : j;
        if (j + 2 * AHEAD < last) prefetch(G + tok[j + 2 * AHEAD] * d + i, 128);
        if (j + 2 * AHEAD + 1 < last) prefetch(G + tok[j + 2 * AHEAD + 1] * d + i, 128);
        const bf16 *g1 = G + tok[j] * d + i, *g2 = G + tok[j2] * d + i;
        const __m512i v = pair_of(val[j], j2 == j ? 0.0f : val[j2]);
        __m512 d1 = _mm512_setzero_ps(), d2 = _mm512_setzero_ps();
        for (int k = 0; k < 4; k++) {
            const __m512i a = _mm512_loadu_si512(g1 + 32 * k), b = _mm512_loadu_si512(g2 + 32 * k);
            d1 = DOT(d1, a, w[k]);
            d2 = DOT(d2, b, w[k]);
            lo[k] = DOT(lo[k], _mm512_unpacklo_epi16(a, b), v);
            hi[k] = DOT(hi[k], _mm512_unpackhi_epi16(a, b), v);
        }
        dots[j] += _mm512_reduce_add_ps(d1);
        if (j2 != j) dots[j2] += _mm512_reduce_add_ps(d2);
    }
    const __m512i f0 = _mm512_loadu_si512(FROM_0), f1 = _mm512_loadu_si512(FROM_1);
    for (int k = 0; k < 4; k++) {
        const __m512 n0 = _mm512_permutex2var_ps(lo[k], f0, hi[k]), n1 = _mm512_permutex2var_ps(lo[k], f1, hi[k]);
        _mm512_storeu_si512(dw + i + 32 * k, (__m512i)_mm512_cvtne2ps_pbh(n1, n0));
    }
}
#endif


/* Bands of 128 columns as in decode: a band of G (B rows × 256 bytes) is what stays in cache. */
static void backward_part(void *p, int64_t lo, int64_t hi) {
    const backward_args *a = (const backward_args *)p;
    const int64_t d = a->d, last = a->ptr[hi];
    for (int64_t j = a->ptr[lo]; j < last; j++) a->dots[j] = 0.0f;
    for (int64_t t = 0; t < a->targets; t++) {
        const bf16 *G = a->G + t * a->G_target_stride, *W = a->W + t * a->W_target_stride;
        bf16 *dW = a->dW + t * a->W_target_stride;
        const int64_t *ptr = a->ptr;
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i + 128 <= d; i += 128)
            for (int64_t f = lo; f < hi; f++)
#ifdef __AVX512BF16__
                backward_pairs_4(G, W + f * d, dW + f * d, a->tok, a->val, a->dots, ptr[f], ptr[f + 1], last, i, d);
#else
                backward_columns_8(G, W + f * d, dW + f * d, a->tok, a->val, a->dots, ptr[f], ptr[f + 1], last, i, d);
#endif
        for (; i + 16 <= d; i += 16)
            for (int64_t f = lo; f < hi; f++)
                backward_columns_1(G, W + f * d, dW + f * d, a->tok, a->val, a->dots, ptr[f], ptr[f + 1], last, i, d);
#endif
        for (int64_t f = lo; f < hi; f++)
            for (int64_t c = i; c < d; c++) {
                const float wc = to_f32(W[f * d + c]);
                float acc = 0.0f;
                for (int64_t j = ptr[f]; j < ptr[f + 1]; j++) {
                    const float x = to_f32(G[a->tok[j] * d + c]);
                    a->dots[j] += x * wc;
                    acc += a->val[j] * x;
                }
                dW[f * d + c] = to_bf16(acc);
            }
    }
}

void clt_decoder_backward(const bf16 *G, int64_t G_target_stride, const bf16 *W, bf16 *dW, int64_t W_target_stride,
                          int64_t targets, const int64_t *ptr, const int64_t *tok, const float *val, float *dots,
                          int64_t features, int64_t d, int threads) {
    backward_args a = {G, G_target_stride, W, dW, W_target_stride, targets, ptr, tok, val, dots, d};
    parallel_over(backward_part, &a, ptr, features, threads);
}

/* -- feature-major order ------------------------------------------------------------------------------------------ */

/* For each layer l (entries [ptr[l], ptr[l+1]) of `feat`, token-major): `bounds[l] [F+1]` the CSR pointers of its
 * entries by feature, `order` the entries' positions within the layer in feature-major order (stable: tokens
 * ascending within a feature) and `tok_by_feat` their tokens in that order. A counting sort: linear, where PyTorch's
 * stable argsort sorts. */
void clt_feature_major(const int64_t *feat, const int64_t *tok, const int64_t *ptr, int64_t L, int64_t F,
                       int64_t *order, int64_t *tok_by_feat, int64_t *bounds, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t l = 0; l < L; l++) {
        const int64_t lo = ptr[l], n = ptr[l + 1] - lo;
        int64_t *b = bounds + l * (F + 1);
        memset(b, 0, (size_t)(F + 1) * sizeof(int64_t));
        for (int64_t j = 0; j < n; j++) b[feat[lo + j] + 1]++;
        for (int64_t f = 0; f < F; f++) b[f + 1] += b[f];
        int64_t *next = malloc((size_t)F * sizeof(int64_t));
        memcpy(next, b, (size_t)F * sizeof(int64_t));
        for (int64_t j = 0; j < n; j++) {
            const int64_t at = lo + next[feat[lo + j]]++;
            order[at] = j, tok_by_feat[at] = tok[lo + j];
        }
        free(next);
    }
}

/* -- error --------------------------------------------------------------------------------------------------------- */

/* `out [L, B, d]` float32 (layer-major) += b_dec [L, d] - y [B, L, d] (bf16, batch-major, as batches come): PyTorch's
 * `out -= y` with y bf16 first makes a float32 copy of y (a fresh 283 MB at the SmolLM2 shape, mostly page faults). */
void clt_error(float *out, const bf16 *y, const float *b_dec, int64_t L, int64_t B, int64_t d, int threads) {
    if (threads < 1 || L * B * d < (1 << 16)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < L * B; r++) {
        const int64_t t = r / B, b = r % B;
        float *o = out + r * d;
        const bf16 *yr = y + (b * L + t) * d;
        const float *bias = b_dec + t * d;
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= d; i += 16) {
            const __m512 e = _mm512_sub_ps(_mm512_loadu_ps(bias + i), widen(yr + i));
            _mm512_storeu_ps(o + i, _mm512_add_ps(_mm512_loadu_ps(o + i), e));
        }
#endif
        for (; i < d; i++) o[i] += bias[i] - to_f32(yr[i]);
    }
}

/* -- optimiser ----------------------------------------------------------------------------------------------------- */

/* Adam(W) on the float32 parameter `p` and moments `m`, `v` (`rows` rows of `d`) from the bf16 gradient `g` of its
 * compute copy `copy`, which is rewritten from the updated parameter: one pass instead of converting the gradient
 * to a float32 scratch tensor, updating, and converting the parameter back (three passes, two of them transposing).
 * With `swapped`, p is [A, R/A, d] and g, copy are [R/A, A, d] (the decoders' [F, T, d] against [T, F, d]). The
 * arithmetic is PyTorch's fused Adam's, in float32 from the same double-precision constants (its rounding may differ
 * where the compiler fused a product and a sum: to ~1e-6 relative). */
void clt_adam(float *p, float *m, float *v, const bf16 *g, bf16 *copy, int64_t rows, int64_t d, int64_t A,
              int swapped, float grad_scale, double lr, double weight_decay, int decoupled, double beta1, double beta2,
              double eps, double step, int threads) {
    const double bc1 = 1 - pow(beta1, step), bc2 = 1 - pow(beta2, step);
    const float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2), c1 = (float)(1 - beta1);
    const float c2 = (float)(1 - beta2), b2 = (float)beta2, epsilon = (float)eps, wd = (float)weight_decay;
    const float shrink = (float)(1 - lr * weight_decay);
    const int lerp_small = c1 < 0.5f;
    const int64_t per = rows / A;
    if (threads < 1 || rows * d < (1 << 16)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t q = swapped ? (r % per) * A + r / per : r; /* the row of g and copy */
        float *pr = p + r * d, *mr = m + r * d, *vr = v + r * d;
        const bf16 *gr = g + q * d;
        bf16 *cr = copy + q * d;
        int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
        const __m512 vscale = _mm512_set1_ps(grad_scale), vshrink = _mm512_set1_ps(shrink), vwd = _mm512_set1_ps(wd);
        const __m512 vc1 = _mm512_set1_ps(c1), vkeep = _mm512_set1_ps(c1 - 1.0f), vb2 = _mm512_set1_ps(b2);
        const __m512 vc2 = _mm512_set1_ps(c2), vstep = _mm512_set1_ps(step_size), vbc2 = _mm512_set1_ps(bc2_sqrt);
        const __m512 veps = _mm512_set1_ps(epsilon);
        for (; i + 16 <= d; i += 16) {
            __m512 grad = _mm512_mul_ps(widen(gr + i), vscale), param = _mm512_loadu_ps(pr + i);
            if (wd != 0.0f) {
                if (decoupled) param = _mm512_mul_ps(param, vshrink);
                else grad = _mm512_fmadd_ps(param, vwd, grad);
            }
            const __m512 m0 = _mm512_loadu_ps(mr + i);
            const __m512 mi = lerp_small ? _mm512_fmadd_ps(vc1, _mm512_sub_ps(grad, m0), m0)
                                         : _mm512_fmadd_ps(vkeep, _mm512_sub_ps(grad, m0), grad);
            const __m512 decayed = _mm512_mul_ps(_mm512_loadu_ps(vr + i), vb2);
            const __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(vc2, grad), grad, decayed);
            const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), vbc2), veps);
            param = _mm512_sub_ps(param, _mm512_div_ps(_mm512_mul_ps(vstep, mi), denom));
            _mm512_storeu_ps(mr + i, mi), _mm512_storeu_ps(vr + i, vi), _mm512_storeu_ps(pr + i, param);
            _mm256_storeu_si256((__m256i *)(cr + i), (__m256i)_mm512_cvtneps_pbh(param));
        }
#endif
        for (; i < d; i++) {
            float grad = to_f32(gr[i]) * grad_scale, param = pr[i];
            if (wd != 0.0f) {
                if (decoupled) param *= shrink;
                else grad = fmaf(param, wd, grad);
            }
            const float mi = lerp_small ? fmaf(c1, grad - mr[i], mr[i]) : fmaf(c1 - 1.0f, grad - mr[i], grad);
            const float vi = fmaf(c2 * grad, grad, vr[i] * b2);
            param -= step_size * mi / (sqrtf(vi) / bc2_sqrt + epsilon);
            mr[i] = mi, vr[i] = vi, pr[i] = param, cr[i] = to_bf16(param);
        }
    }
}

/* -- sampler ------------------------------------------------------------------------------------------------------- */

/* Row i of `src [n, len]` (bf16) to row positions[i] of `dst` (bf16): `x·scale + bias` per column in float32 (the
 * Normalizer's arithmetic: a product, then a sum, each rounded; bf16 by round to nearest even), or a plain copy
 * without `scale`; bad[i] |= whether the source row holds a NaN or an Inf. One pass, where PyTorch's path converts
 * to float32, scales, converts back and scatters (four passes and two float32 temporaries). */
void clt_prepare_rows(const bf16 *src, int64_t n, int64_t len, const float *scale, const float *bias, bf16 *dst,
                      const int64_t *positions, uint8_t *bad, int threads) {
    if (threads < 1 || n * len < (1 << 16)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const bf16 *x = src + r * len;
        bf16 *y = dst + positions[r] * len;
        int special = 0; /* whether a value's exponent is all ones (NaN or Inf) */
        int64_t i = 0;
        if (scale == NULL) {
            for (; i < len; i++) {
                special |= (x[i] & 0x7f80u) == 0x7f80u;
                y[i] = x[i];
            }
        } else {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
            for (; i + 16 <= len; i += 16) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(x + i));
                const __m256i exponent = _mm256_and_si256(raw, _mm256_set1_epi16(0x7f80));
                special |= _mm256_movemask_epi8(_mm256_cmpeq_epi16(exponent, _mm256_set1_epi16(0x7f80))) != 0;
                const __m512 v = _mm512_add_ps(_mm512_mul_ps(widen(x + i), _mm512_loadu_ps(scale + i)),
                                               _mm512_loadu_ps(bias + i));
                _mm256_storeu_si256((__m256i *)(y + i), (__m256i)_mm512_cvtneps_pbh(v));
            }
#endif
            for (; i < len; i++) {
                special |= (x[i] & 0x7f80u) == 0x7f80u;
                const float prod = to_f32(x[i]) * scale[i];
                y[i] = to_bf16(prod + bias[i]);
            }
        }
        if (special) bad[r] = 1;
    }
}

/* -- quantised rows ------------------------------------------------------------------------------------------------ */

/* Codes of quantised stores (data/quantize.py): kind 0 int8, kind 1 fp8 e4m3fn as its bits (sign, 4 exponent bits
 * of bias 7, 3 mantissa bits; no infinities, 0x7f/0xff NaN, largest 448). Every conversion is exact or rounds to
 * nearest even exactly as PyTorch's (c10's fp8e4m3fn_from_fp32_value), so the codes and values equal the PyTorch path
 * bit for bit. */

static inline float fp8_to_f32(uint8_t b) {
    const uint32_t mag = b & 0x7fu, sign = (uint32_t)(b & 0x80u) << 24;
    uint32_t u;
    if (mag == 0x7fu) u = sign | 0x7fc00000u;
    else if (mag < 8u) { /* subnormal: mag · 2^-9, exact */
        const float f = (float)mag * 0x1p-9f;
        memcpy(&u, &f, 4);
        u |= sign;
    } else u = sign | ((mag << 20) + (120u << 23)); /* rebias the exponent 7 -> 127, mantissa as it is */
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint8_t f32_to_fp8(float f) { /* |f| <= 448, finite; round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 24) & 0x80u;
    u &= 0x7fffffffu;
    uint32_t code;
    if (u < (121u << 23)) { /* below 2^-6: a multiple of 2^-9, rounded by adding 2^14 */
        float a, t;
        memcpy(&a, &u, 4);
        t = a + 16384.0f;
        uint32_t tb;
        memcpy(&tb, &t, 4);
        code = tb - 0x46800000u;
    } else {
        const uint32_t odd = (u >> 20) & 1u;
        u += 0xc4000000u + 0x7ffffu + odd; /* (7 - 127) << 23, wrapped, then the rounding */
        code = u >> 20;
    }
    return (uint8_t)(code | sign);
}

static inline float code_to_f32(const uint8_t *q, int64_t i, int kind) {
    return kind == 0 ? (float)(int8_t)q[i] : fp8_to_f32(q[i]);
}

#ifdef __AVX512F__
static inline __m512 codes_to_f32(const uint8_t *q, int kind) { /* 16 codes */
    const __m128i raw = _mm_loadu_si128((const __m128i *)q);
    if (kind == 0) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
    const __m512i b = _mm512_cvtepu8_epi32(raw);
    const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
    __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23));
    const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(0x1p-9f));
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8)), _mm512_castps_si512(sub));
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)),
                                 _mm512_set1_epi32(0x7fc00000));
    return _mm512_castsi512_ps(_mm512_or_si512(bits, sign));
}

static inline __m512i f32_to_fp8_16(__m512 v) { /* 16 values, within ±448: their fp8 codes (in 32-bit lanes) */
    const __m512i u0 = _mm512_castps_si512(v);
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u0, 24), _mm512_set1_epi32(0x80));
    const __m512i u = _mm512_and_si512(u0, _mm512_set1_epi32(0x7fffffff));
    const __m512 t = _mm512_add_ps(_mm512_castsi512_ps(u), _mm512_set1_ps(16384.0f));
    const __m512i small = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x46800000));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 20), _mm512_set1_epi32(1));
    const __m512i big = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32((int)(0xc4000000u + 0x7ffffu))), odd), 20);
    const __m512i code = _mm512_mask_mov_epi32(big, _mm512_cmplt_epu32_mask(u, _mm512_set1_epi32(121 << 23)), small);
    return _mm512_or_si512(code, sign);
}
#endif

/* Rows `src [n, L, d]` (bf16) to codes `q [n, L, d]` and scales `scale [n, L]`: per row r and layer l,
 * z = (x - centre[l]) / spread[l] (float32), a = max |z|, scale = a / qmax (127 int8, 448 fp8), q = round(z / scale)
 * (int8: to nearest even, clamped to ±127; fp8: clamped to ±448, rounded to nearest even). A row-layer holding a
 * NaN or an Inf (in x or in z) gets scale NaN and codes 0, so it reads back as NaN; scale 0 (all z zero) codes 0. */
void clt_quantize_rows(const bf16 *src, int64_t n, int64_t L, int64_t d, const float *centre, const float *spread,
                       int kind, uint8_t *q, float *scale, int threads) {
    const float qmax = kind == 0 ? 127.0f : 448.0f;
    if (threads < 1 || n * L * d < (1 << 16)) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        float *z = malloc((size_t)d * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t rl = 0; rl < n * L; rl++) {
            const int64_t l = rl % L;
            const bf16 *x = src + rl * d;
            const float *c = centre + l * d, *s = spread + l * d;
            uint8_t *out = q + rl * d;
            float amax = 0.0f;
            int bad = 0;
            int64_t i = 0;
#ifdef __AVX512F__
            __m512 vmax = _mm512_setzero_ps();
            const __m512 big = _mm512_set1_ps(3.40282347e38f);
            for (; i + 16 <= d; i += 16) {
                const __m512 v = _mm512_div_ps(_mm512_sub_ps(widen(x + i), _mm512_loadu_ps(c + i)),
                                               _mm512_loadu_ps(s + i));
                _mm512_storeu_ps(z + i, v);
                const __m512 a = _mm512_abs_ps(v);
                bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ) != 0;
                vmax = _mm512_max_ps(vmax, a);
            }
            amax = _mm512_reduce_max_ps(vmax);
#endif
            for (; i < d; i++) {
                z[i] = (to_f32(x[i]) - c[i]) / s[i];
                const float a = fabsf(z[i]);
                bad |= !(a <= 3.40282347e38f);
                if (a > amax) amax = a;
            }
            const float sc = amax / qmax;
            const float div = !bad && sc > 0.0f ? sc : 1.0f;
            scale[rl] = bad ? NAN : sc;
            if (bad) {
                memset(out, 0, (size_t)d);
                continue;
            }
            i = 0;
#ifdef __AVX512F__
            const __m512 vdiv = _mm512_set1_ps(div), hi = _mm512_set1_ps(qmax), lo = _mm512_set1_ps(-qmax);
            for (; i + 16 <= d; i += 16) {
                const __m512 v = _mm512_div_ps(_mm512_loadu_ps(z + i), vdiv);
                __m512i k;
                if (kind == 0) {
                    k = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    k = _mm512_min_epi32(_mm512_max_epi32(k, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
                } else k = f32_to_fp8_16(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
                _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(k));
            }
#endif
            for (; i < d; i++) {
                float v = z[i] / div;
                if (kind == 0) {
                    float r = nearbyintf(v);
                    r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
                    out[i] = (uint8_t)(int8_t)r;
                } else {
                    v = v > qmax ? qmax : v < -qmax ? -qmax : v;
                    out[i] = f32_to_fp8(v);
                }
            }
        }
        free(z);
    }
}

/* Codes `q [n, L, d]` with scales `scale [n, L]` back to bf16: h = bf16(((float)q · scale) · spread + centre), each
 * step rounded in float32 (the PyTorch path's order). Row i goes to row positions[i] of `dst` (row i without
 * `positions`), as h, or with `nscale` as bf16(h · nscale + nbias) (the Normalizer's arithmetic, as
 * clt_prepare_rows); bad[i] |= whether h holds a NaN or an Inf (with `bad`). One pass from the stored bytes to the
 * sampler's window. */
void clt_dequantize_rows(const uint8_t *q, int kind, const float *scale, int64_t n, int64_t L, int64_t d,
                         const float *centre, const float *spread, const float *nscale, const float *nbias, bf16 *dst,
                         const int64_t *positions, uint8_t *bad, int threads) {
    if (threads < 1 || n * L * d < (1 << 16)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        bf16 *y = dst + (positions ? positions[r] : r) * L * d;
        int special = 0;
        for (int64_t l = 0; l < L; l++) {
            const uint8_t *x = q + (r * L + l) * d;
            const float s = scale[r * L + l];
            const float *c = centre + l * d, *w = spread + l * d;
            const float *ns = nscale ? nscale + l * d : NULL, *nb = nbias ? nbias + l * d : NULL;
            bf16 *o = y + l * d;
            int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
            const __m512 vs = _mm512_set1_ps(s);
            const __m256i exp_mask = _mm256_set1_epi16(0x7f80);
            for (; i + 16 <= d; i += 16) {
                const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(codes_to_f32(x + i, kind), vs),
                                                             _mm512_loadu_ps(w + i)),
                                               _mm512_loadu_ps(c + i));
                __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
                special |= _mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_and_si256(h, exp_mask), exp_mask)) != 0;
                if (ns) {
                    const __m512 wide = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                    h = (__m256i)_mm512_cvtneps_pbh(
                        _mm512_add_ps(_mm512_mul_ps(wide, _mm512_loadu_ps(ns + i)), _mm512_loadu_ps(nb + i)));
                }
                _mm256_storeu_si256((__m256i *)(o + i), h);
            }
#endif
            for (; i < d; i++) {
                const float a = code_to_f32(x, i, kind) * s;
                const float b = a * w[i];
                bf16 h = to_bf16(b + c[i]);
                special |= (h & 0x7f80u) == 0x7f80u;
                if (ns) {
                    const float prod = to_f32(h) * ns[i];
                    h = to_bf16(prod + nb[i]);
                }
                o[i] = h;
            }
        }
        if (special && bad) bad[r] = 1;
    }
}

/* -- selection ----------------------------------------------------------------------------------------------------- */

/* The entries of z = float(low) + bias (`low [B, F]` bf16 row-major, `bias [F]`) at or above `floor`: their flat
 * positions (ascending) and values, without forming z. Returns how many there are; writes at most `capacity`. Two
 * passes over `low` (count, then write at each thread's offset), both reading 2 bytes an entry. */
int64_t clt_entries_above(const bf16 *low, const float *bias, int64_t B, int64_t F, float floor, int64_t *positions,
                          float *values, int64_t capacity, int threads) {
    enum { MAX_THREADS = 256 };
    int64_t counts[MAX_THREADS + 1] = {0};
    if (threads < 1 || B * F < (1 << 16)) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
#pragma omp parallel num_threads(threads)
    {
        int i, n;
        thread_of(&i, &n);
        const int64_t lo = B * i / n, hi = B * (i + 1) / n;
        int64_t found = 0;
        for (int64_t b = lo; b < hi; b++)
            for (int64_t f = 0; f < F; f++) found += to_f32(low[b * F + f]) + bias[f] >= floor;
        counts[i + 1] = found;
#pragma omp barrier
        int64_t at = 0;
        for (int k = 0; k <= i; k++) at += counts[k];
        for (int64_t b = lo; b < hi && at < capacity; b++)
            for (int64_t f = 0; f < F; f++) {
                const float z = to_f32(low[b * F + f]) + bias[f];
                if (z >= floor && at < capacity) positions[at] = b * F + f, values[at++] = z;
            }
    }
    int64_t total = 0;
    for (int k = 1; k <= threads; k++) total += counts[k];
    return total;
}
