/* Hand-fused per-element passes of the fused CPU path (built by kernels/cpu/build.py, called through
 * kernels/cpu/passes.py from velo.py and adafac.py).
 *
 * A pass walks a range of a factored tensor's elements (any rank >= 2, contiguous) in tiles of T elements:
 * it computes the per-element features of a tile into a feature-major buffer (f[k * T + t]), then either
 * sums their squares (the per-tensor normalisation) or runs the per-element MLP on them with
 * register-blocked vector code and writes the parameter update. The row statistics (over the tensor's shape
 * with its largest axis d0 dropped) and the column statistics (axis d1 dropped) come in as small arrays
 * computed by torch; see "Factored tensors of any rank" below for how an element finds its entries. The math
 * restates Python functions, each cited where it is restated (the reference, velo.py / adafac.py /
 * accumulators.py, is the specification; the column layouts are those of the foreach paths that reorganise
 * it), in float32; only summation order and FMA contraction differ (sums of squares are accumulated in
 * double).
 *
 * Each exported function takes a whole tensor (n elements) and splits it into at most nslots ranges run
 * by OpenMP threads; built with -fopenmp against the libgomp torch loaded, they share torch's thread pool
 * (Python threads would fight its spinning workers for the cores). Range j writes its partial sums into
 * slot j of the caller's arrays.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define V 8                        /* float lanes of one vector (AVX2; narrower ISAs split it) */
#define T 48                       /* elements per tile: 2 blocks of 3 vectors */
#define MAXH 256                   /* widest hidden layer the kernels accept */

/* The accumulators are rounded op for op as torch rounds them (no FMA contraction): they are state. */
#if defined(__clang__)
#define EXACT_FN
#define EXACT_BODY _Pragma("clang fp contract(off)")
#else
#define EXACT_FN __attribute__((optimize("fp-contract=off")))
#define EXACT_BODY
#endif

typedef float vf __attribute__((vector_size(V * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(V * sizeof(int32_t))));

/* Pin a loaded vector in a register: without it GCC re-reads the input from memory in every FMA (memory
 * operands), which makes the MLP's inner loop load-bound. */
#if defined(__x86_64__) && defined(__AVX__)
#define IN_REG(v) __asm__("" : "+x"(v))
#else
#define IN_REG(v) (void)0
#endif

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void stv(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf bc(float x) { return (vf){x, x, x, x, x, x, x, x}; }
static inline vf relu(vf a) { return (vf)((vi)a & (a > bc(0.0f))); }

/* exp(x) of 8 floats (Cephes' expf: x = n ln2 + r, degree-6 polynomial in r, times 2^n), ~1 ulp; inputs
 * are clamped to [-87.3, 88.7] (the learned optimizers' exp arguments are O(1e-2)); NaN stays NaN. */
static inline vf vexp(vf x) {
    const vi nan = x != x;
    const vf x0 = x, hi = bc(88.7f), lo = bc(-87.3f);
    x = (vf)(((vi)x & (x < hi)) | ((vi)hi & ~(x < hi)));
    x = (vf)(((vi)x & (x > lo)) | ((vi)lo & ~(x > lo)));
    const vf shifter = bc(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf n = (x * bc(1.44269504088896341f) + shifter) - shifter;
    const vf r = (x - n * bc(0.693359375f)) - n * bc(-2.12194440e-4f);
    vf y = bc(1.9875691500e-4f);
    y = y * r + bc(1.3981999507e-3f);
    y = y * r + bc(8.3334519073e-3f);
    y = y * r + bc(4.1665795894e-2f);
    y = y * r + bc(1.6666665459e-1f);
    y = y * r + bc(5.0000001201e-1f);
    y = y * (r * r) + r + bc(1.0f);
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)(((vi)(y * (vf)e) & ~nan) | ((vi)x0 & nan));
}

/* sqrt of 8 floats (a lane loop the compiler turns into one vector sqrt). */
static inline vf vsqrt(vf x) {
    float a[V];
    stv(a, x);
    for (int l = 0; l < V; l++) a[l] = sqrtf(a[l]);
    return ld(a);
}

/* Store the first n of T results (a tile's valid elements). */
static inline void store_tile(float *dst, const float *src, int n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

/* out (J x T) += w (K x J, row-major) contracted with x (K x T), then relu if asked; out holds the init.
 * Blocks of 4 outputs x 3 vectors: 12 accumulators, 3 inputs and a broadcast weight in the 16 AVX
 * registers; per k, 7 loads feed 12 FMAs (FMA-bound). */
static void layer(int K, int J, const float *restrict w, const float *restrict x, float *restrict out,
                  int do_relu) {
    int j = 0;
    for (; j + 4 <= J; j += 4) {
        for (int t = 0; t < T; t += 3 * V) {
            float *o0 = out + (j + 0) * T + t, *o1 = out + (j + 1) * T + t;
            float *o2 = out + (j + 2) * T + t, *o3 = out + (j + 3) * T + t;
            vf a00 = ld(o0), a01 = ld(o0 + V), a02 = ld(o0 + 2 * V);
            vf a10 = ld(o1), a11 = ld(o1 + V), a12 = ld(o1 + 2 * V);
            vf a20 = ld(o2), a21 = ld(o2 + V), a22 = ld(o2 + 2 * V);
            vf a30 = ld(o3), a31 = ld(o3 + V), a32 = ld(o3 + 2 * V);
            const float *xk = x + t, *wk = w + j;
            for (int k = 0; k < K; k++, xk += T, wk += J) {
                vf x0 = ld(xk), x1 = ld(xk + V), x2 = ld(xk + 2 * V);
                IN_REG(x0);
                IN_REG(x1);
                IN_REG(x2);
                vf wv = bc(wk[0]);
                a00 += wv * x0; a01 += wv * x1; a02 += wv * x2;
                wv = bc(wk[1]);
                a10 += wv * x0; a11 += wv * x1; a12 += wv * x2;
                wv = bc(wk[2]);
                a20 += wv * x0; a21 += wv * x1; a22 += wv * x2;
                wv = bc(wk[3]);
                a30 += wv * x0; a31 += wv * x1; a32 += wv * x2;
            }
            if (do_relu) {
                a00 = relu(a00); a01 = relu(a01); a02 = relu(a02);
                a10 = relu(a10); a11 = relu(a11); a12 = relu(a12);
                a20 = relu(a20); a21 = relu(a21); a22 = relu(a22);
                a30 = relu(a30); a31 = relu(a31); a32 = relu(a32);
            }
            stv(o0, a00); stv(o0 + V, a01); stv(o0 + 2 * V, a02);
            stv(o1, a10); stv(o1 + V, a11); stv(o1 + 2 * V, a12);
            stv(o2, a20); stv(o2 + V, a21); stv(o2 + 2 * V, a22);
            stv(o3, a30); stv(o3 + V, a31); stv(o3 + 2 * V, a32);
        }
    }
    for (; j < J; j++) {
        for (int t = 0; t < T; t += 2 * V) {
            float *o = out + j * T + t;
            vf a0 = ld(o), a1 = ld(o + V);
            const float *xk = x + t;
            for (int k = 0; k < K; k++, xk += T) {
                const vf wv = bc(w[k * J + j]);
                a0 += wv * ld(xk); a1 += wv * ld(xk + V);
            }
            if (do_relu) { a0 = relu(a0); a1 = relu(a1); }
            stv(o, a0); stv(o + V, a1);
        }
    }
}

/* out[j * T + t] = bias[j] for every t (a layer's init). */
static void fill_bias(int J, const float *bias, float *out) {
    for (int j = 0; j < J; j++)
        for (int t = 0; t < T; t++) out[j * T + t] = bias[j];
}

/* Zero columns [t0, T) of a K x T tile (the padding of a range's last tile). */
static void zero_tail(int K, int t0, float *f) {
    if (t0 < T)
        for (int k = 0; k < K; k++) memset(f + k * T + t0, 0, (size_t)(T - t0) * sizeof(float));
}

/* Add sum_t f[k * T + t]^2 to sums[k] (double) for k < K; padding columns are zero. */
static void add_sumsq(int K, const float *f, double *sums) {
    for (int k = 0; k < K; k++) {
        const float *x = f + k * T;
        vf s = bc(0.0f);
        for (int t = 0; t < T; t += V) { vf v = ld(x + t); s += v * v; }
        double acc = 0.0;
        for (int l = 0; l < V; l++) acc += (double)s[l];
        sums[k] += acc;
    }
}

/* Layer-1 init of a segment: h[j * T + t0 + t] = a0t[j * na + t * da] + a1t[j * nb + t * db], t < len (the
 * row's and the column's shares of the first layer, feature scales folded in; (H, na) and (H, nb) arrays
 * offset to the segment's first entries, which advance by da / db (0 or 1) per element). */
static void init_seg(int H, int t0, int len, const float *a0t, int da, int64_t na, const float *a1t, int db,
                     int64_t nb, float *h) {
    for (int j = 0; j < H; j++) {
        const float *pa = a0t + j * na, *pb = a1t + j * nb;
        float *dst = h + j * T + t0;
        if (!da) {
            const float a = pa[0];
            if (db) for (int t = 0; t < len; t++) dst[t] = a + pb[t];
            else for (int t = 0; t < len; t++) dst[t] = a + pb[0];
        } else if (!db) {
            const float b = pb[0];
            for (int t = 0; t < len; t++) dst[t] = pa[t] + b;
        } else {
            for (int t = 0; t < len; t++) dst[t] = pa[t] + pb[t];
        }
    }
}

/* Momentum (3 decays, interleaved) and rms (1 decay) updates of elements [e0, e0 + len):
 * m = d * m + (1 - d) * g, v = d * v + (1 - d) * g^2 (the (1 - d) come in precomputed, as torch does):
 * accumulators.momentum_update / rms_update. */
EXACT_FN static void update_acc(int64_t e0, int len, const float *g, float *m, float *rms,
                                const float *md, const float *mc, float rd, float rc) {
    EXACT_BODY
    for (int t = 0; t < len; t++) {
        const int64_t e = e0 + t;
        const float gi = g[e];
        float *me = m + 3 * e;
        me[0] = md[0] * me[0] + mc[0] * gi;
        me[1] = md[1] * me[1] + mc[1] * gi;
        me[2] = md[2] * me[2] + mc[2] * gi;
        rms[e] = rd * rms[e] + rc * (gi * gi);
    }
}

/* Per-element features of the tile of elements [e0, e0 + len) into a feature-major tile f (K x T); q: the
 * tile's Adafactor factor products (3 per element, tile_factors). */
typedef void (*feat_fn)(float *restrict f, int len, int64_t e0, const float *p, const float *g,
                        const float *m, const float *rms, const float *q);

/* Run BODY on ranges [i0, i1) of [0, n), one per thread (at most nslots), j the range's slot. */
#ifdef _OPENMP
#define THREAD_ID(k, j) (k) = omp_get_num_threads(), (j) = omp_get_thread_num()
#else
#define THREAD_ID(k, j) (k) = 1, (j) = 0, (void)nslots
#endif
#define PARALLEL_RANGES(n, nslots, ...)                                                                 \
    _Pragma("omp parallel num_threads(nslots)") {                                                       \
        int k_, j;                                                                                      \
        THREAD_ID(k_, j);                                                                               \
        const int64_t i0 = (n) * j / k_, i1 = (n) * (j + 1) / k_;                                       \
        __VA_ARGS__;                                                                                    \
    }

/* Factored tensors of any rank. Besides its own elements (row-major, contiguous), a factored tensor's
 * element reads two small arrays: the row statistics, over the tensor's shape with axis d0 dropped, and the
 * column statistics, with axis d1 dropped (features.factored_dims: d0 the largest axis, in numpy argsort
 * order), each laid out as torch lays out a reduction over that axis (contiguous, keepdim=False). Element e
 * finds its entry in the array that drops the axis of stride st and size s at
 *     (e / (st * s)) * st + e % st,
 * which, from e on, stays constant for a run of elements (st == 1: the dropped axis is the innermost one
 * larger than 1, runs of s) or advances by one per element (st > 1, runs up to the next multiple of st).
 * A 2-D (rows, cols) tensor is the case of one of each; a conv kernel (out, in, kh, kw) factored over out
 * and in advances in both over runs of kh * kw. The passes walk a tile in segments on which both entries
 * run so. */
typedef struct {
    int64_t st, s; /* stride and size of the dropped axis */
} axis_t;
typedef struct {
    axis_t a, b;   /* the axes the row (a: d0) and column (b: d1) arrays drop */
    int64_t na, nb; /* their entries: n / a.s and n / b.s */
} layout_t;

static inline int64_t entry_of(axis_t x, int64_t e) { return (e / (x.st * x.s)) * x.st + e % x.st; }
static inline int64_t run_left(axis_t x, int64_t e) {
    const int64_t q = x.st == 1 ? x.s : x.st;
    return q - e % q;
}

/* Walk elements [i, i + n) of a factored tensor with layout L in segments; the body sees the segment's first
 * element e, its row / column entries ia / ib and their steps da / db (0 or 1), its length len and its tile
 * column t0. (A 2-D tile is one or two segments; a 3 x 3 conv kernel's about n / 9.) */
#define FOR_SEGMENTS(i, n, L, ...)                                                                      \
    for (int t0 = 0; t0 < (n);) {                                                                       \
        const int64_t e = (i) + t0, ia = entry_of((L).a, e), ib = entry_of((L).b, e);                   \
        const int da = (L).a.st != 1, db = (L).b.st != 1;                                               \
        int64_t len_ = (n) - t0, ra_ = run_left((L).a, e), rb_ = run_left((L).b, e);                    \
        if (ra_ < len_) len_ = ra_;                                                                     \
        if (rb_ < len_) len_ = rb_;                                                                     \
        const int len = (int)len_;                                                                      \
        __VA_ARGS__;                                                                                    \
        t0 += len;                                                                                      \
    }

/* q[3 t + k] = fa[row entry][k] * fb[column entry][k], the Adafactor factor product of decay k of the tile's
 * element t (accumulators.row_col_factors' row and column factors, as velo._elem_chunk multiplies them). */
static inline __attribute__((always_inline)) void factor_seg(float *restrict q, int len, const float *ra,
                                                             int sa, const float *rb, int sb) {
    for (int t = 0; t < len; t++)
        for (int k = 0; k < 3; k++) q[3 * t + k] = ra[sa * t + k] * rb[sb * t + k];
}

static void tile_factors(int64_t i, int n, layout_t L, const float *fa, const float *fb, float *restrict q) {
    FOR_SEGMENTS(i, n, L, {
        const float *ra = fa + 3 * ia, *rb = fb + 3 * ib;
        float *qt = q + 3 * t0;
        if (!da && db) factor_seg(qt, len, ra, 0, rb, 3); /* each a specialisation */
        else if (da && !db) factor_seg(qt, len, ra, 3, rb, 0);
        else if (da && db) factor_seg(qt, len, ra, 3, rb, 3);
        else factor_seg(qt, len, ra, 0, rb, 0);
    });
}

typedef double vd __attribute__((vector_size(4 * sizeof(double))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

/* Add the tile [i, i + n)'s p, m (3), rms (the state before this step's update) and their squares to the
 * double accumulators s1 / s2 (5 each), element by element in double: the sums velo._lstm_row_from_stats
 * turns into velo.lstm_features_for_tensor's means and variances. */
static void state_stats_tile(int64_t i, int n, const float *p, const float *m, const float *rms, vd *s1,
                             vd *s2) {
    float f[5 * T];
    for (int t = 0; t < n; t++) {
        const int64_t e = i + t;
        f[0 * T + t] = p[e];
        f[1 * T + t] = m[3 * e]; f[2 * T + t] = m[3 * e + 1]; f[3 * T + t] = m[3 * e + 2];
        f[4 * T + t] = rms[e];
    }
    zero_tail(5, n, f);
    for (int k = 0; k < 5; k++) {
        for (int t = 0; t < T; t += 4) {
            vf4 x4;
            memcpy(&x4, f + k * T + t, sizeof x4);
            const vd x = __builtin_convertvector(x4, vd);
            s1[k] += x;
            s2[k] += x * x;
        }
    }
}

/* stats (9) += sum p^2, sum m (3), sum m^2 (3), sum rms, sum rms^2 from the accumulators s1 / s2. */
static void state_stats_add(const vd *s1, const vd *s2, double *stats) {
    double h1[5], h2[5];
    for (int k = 0; k < 5; k++) {
        h1[k] = (s1[k][0] + s1[k][1]) + (s1[k][2] + s1[k][3]);
        h2[k] = (s2[k][0] + s2[k][1]) + (s2[k][2] + s2[k][3]);
    }
    stats[0] += h2[0];
    for (int k = 0; k < 3; k++) { stats[1 + k] += h1[1 + k]; stats[4 + k] += h2[1 + k]; }
    stats[7] += h1[4];
    stats[8] += h2[4];
}

/* Pass 1 over elements [i0, i1): update m / rms in place, add the sums of squares of the K features to
 * sums; with stats (VeLO's LSTM inputs), first add the previous state's statistics (state_stats_add). */
static void pass1(feat_fn feat, int K, int64_t i0, int64_t i1, layout_t L, const float *p, const float *g,
                  float *m, float *rms, const float *fa, const float *fb, const float *md, const float *mc,
                  float rd, float rc, double *sums, double *stats) {
    float f[32 * T], q[3 * T];
    vd s1[5] = {{0}}, s2[5] = {{0}};
    for (int64_t i = i0; i < i1; i += T) {
        const int n = (int)(i1 - i < T ? i1 - i : T);
        if (stats) state_stats_tile(i, n, p, m, rms, s1, s2);
        update_acc(i, n, g, m, rms, md, mc, rd, rc);
        tile_factors(i, n, L, fa, fb, q);
        feat(f, n, i, p, g, m, rms, q);
        zero_tail(K, n, f);
        add_sumsq(K, f, sums);
    }
    if (stats) state_stats_add(s1, s2, stats);
}

/* The MLP output o (J x T) of the tile of elements [i, i + n): features, relu(K -> H), relu(H -> H), H -> J;
 * the first layer starts from a0t[:, row] + a1t[:, col] (its bias and the row / column features' share). */
static void mlp_tile(feat_fn feat, int K, int H, int J, int64_t i, int n, layout_t L, const float *p,
                     const float *g, const float *m, const float *rms, const float *fa, const float *fb,
                     const float *we, const float *a0t, const float *a1t, const float *w2, const float *b2,
                     const float *w3, const float *b3, float *f, float *h1, float *h2, float *o) {
    float q[3 * T];
    tile_factors(i, n, L, fa, fb, q);
    feat(f, n, i, p, g, m, rms, q);
    FOR_SEGMENTS(i, n, L, init_seg(H, t0, len, a0t + ia, da, L.na, a1t + ib, db, L.nb, h1));
    zero_tail(K, n, f);
    zero_tail(H, n, h1);
    layer(K, H, we, f, h1, 1);
    fill_bias(H, b2, h2);
    layer(H, H, w2, h1, h2, 1);
    fill_bias(J, b3, o);
    layer(H, J, w3, h2, o, 0);
}

/* ---------------------------------------------------------------------------------------------------- */
/* The per-element features of both families (velo.ff_inputs / adafac.adafac_features), those that vary
 * per element, in their foreach paths' column order (velo: a constant, so each caller inlines its loop):
 * small_fc_lopt (adafac._elem_features, 16): g, p, m (3), rms, m * rsqrt (3), rsqrt, g * fac (3),
 *                                                m * fac (3);
 * VeLO (velo._elem_chunk, 18): g, clip(g, -0.1, 0.1), p, m (3), rms, m * rsqrt (3), rsqrt, g * fac (3),
 *                                  g * rsqrt, m * fac (3);
 * rsqrt = 1 / sqrt(rms + 1e-6), fac = q (the Adafactor row and column factors' product, 3 decays). */
static inline __attribute__((always_inline)) void features(const int velo, float *restrict f, int len,
                                                            int64_t e0, const float *p, const float *g,
                                                            const float *m, const float *rms,
                                                            const float *q) {
    for (int t = 0; t < len; t++) {
        const int64_t e = e0 + t;
        const float gi = g[e], m0 = m[3 * e], m1 = m[3 * e + 1], m2 = m[3 * e + 2], v = rms[e];
        const float rs = 1.0f / sqrtf(v + 1e-6f);
        const float q0 = q[3 * t], q1 = q[3 * t + 1], q2 = q[3 * t + 2];
        float *o = f + t;
        int k = 0;
        o[k++ * T] = gi;
        if (velo) o[k++ * T] = gi < -0.1f ? -0.1f : (gi > 0.1f ? 0.1f : gi); /* torch.clamp: NaN stays */
        o[k++ * T] = p[e];
        o[k++ * T] = m0; o[k++ * T] = m1; o[k++ * T] = m2; o[k++ * T] = v;
        o[k++ * T] = m0 * rs; o[k++ * T] = m1 * rs; o[k++ * T] = m2 * rs; o[k++ * T] = rs;
        o[k++ * T] = gi * q0; o[k++ * T] = gi * q1; o[k++ * T] = gi * q2;
        if (velo) o[k++ * T] = gi * rs;
        o[k++ * T] = m0 * q0; o[k++ * T] = m1 * q1; o[k++ * T] = m2 * q2;
    }
}

static void sfc_features(float *restrict f, int len, int64_t e0, const float *p, const float *g,
                         const float *m, const float *rms, const float *q) {
    features(0, f, len, e0, p, g, m, rms, q);
}

static void velo_features(float *restrict f, int len, int64_t e0, const float *p, const float *g,
                          const float *m, const float *rms, const float *q) {
    features(1, f, len, e0, p, g, m, rms, q);
}

/* small_fc_lopt pass 2 over elements [i0, i1): MLP 16 -> H -> H -> 2, the step
 * ((o0 * exp(o1 * exp_mult)) * step_mult) * scale (* lr) (adafac._step, then muLO's scale and the lr as in
 * adafac._adafac_reference), out = p - step (out may alias p). */
static void sfc_pass2_range(int64_t i0, int64_t i1, layout_t L, int H, const float *p, const float *g,
                            const float *m, const float *rms, const float *fa, const float *fb,
                            const float *we, const float *a0t, const float *a1t, const float *w2,
                            const float *b2, const float *w3, const float *b3, float exp_mult,
                            float step_mult, float scale, float lr, float *out) {
    float f[16 * T], h1[MAXH * T], h2[MAXH * T], o[2 * T];
    for (int64_t i = i0; i < i1; i += T) {
        const int n = (int)(i1 - i < T ? i1 - i : T);
        mlp_tile(sfc_features, 16, H, 2, i, n, L, p, g, m, rms, fa, fb, we, a0t, a1t, w2, b2, w3, b3, f,
                 h1, h2, o);
        float res[T];
        for (int t = 0; t < T; t += V) {
            vf step = ld(o + t) * vexp(ld(o + T + t) * bc(exp_mult)) * bc(step_mult);
            step = step * bc(scale);
            if (lr != 1.0f) step = step * bc(lr);
            stv(res + t, ld(f + 1 * T + t) - step); /* f[1]: p */
        }
        store_tile(out + i, res, n);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* The sums of this step's g^2 + 1e-30 over axis d0 and over axis d1 for elements [i0, i1), into this
 * range's own rows[na] and cols[nb] (double): the means accumulators.factored_rolling takes. */
static void gsq_range(int64_t i0, int64_t i1, layout_t L, const float *g, double *rows, double *cols) {
    for (int64_t i = i0; i < i1; i += T) {
        const int n = (int)(i1 - i < T ? i1 - i : T);
        FOR_SEGMENTS(i, n, L, {
            double *ra = rows + ia, *rb = cols + ib;
            if (da && db) {
                for (int t = 0; t < len; t++) {
                    const float gi = g[e + t], q = gi * gi + 1e-30f;
                    ra[t] += (double)q;
                    rb[t] += (double)q;
                }
            } else {
                double acc = 0.0;
                for (int t = 0; t < len; t++) {
                    const float gi = g[e + t], q = gi * gi + 1e-30f;
                    acc += (double)q;
                    if (da) ra[t] += (double)q;
                    if (db) rb[t] += (double)q;
                }
                if (!da) ra[0] += acc;
                if (!db) rb[0] += acc;
            }
        });
    }
}

/* VeLO pass 2 over elements [i0, i1): MLP 18 -> H -> H -> 3 and the output head, velo.output_step:
 * step = dir * (pscale * exp(mag * exp_mult)) * step_mult (pscale < 0: dir * exp(..) * step_mult), then
 * lr_mult * step, * 1 / sqrt(rms + 1e-6) if precond, out = p - step (lr == 1) or p - lr * step. */
static void velo_pass2_range(int64_t i0, int64_t i1, layout_t L, int H, const float *p, const float *g,
                             const float *m, const float *rms, const float *fa, const float *fb,
                             const float *we, const float *a0t, const float *a1t, const float *w2,
                             const float *b2, const float *w3, const float *b3, float exp_mult,
                             float step_mult, float pscale, float lr_mult, int precond, float lr,
                             float *out) {
    float f[18 * T], h1[MAXH * T], h2[MAXH * T], o[3 * T];
    for (int64_t i = i0; i < i1; i += T) {
        const int n = (int)(i1 - i < T ? i1 - i : T);
        mlp_tile(velo_features, 18, H, 3, i, n, L, p, g, m, rms, fa, fb, we, a0t, a1t, w2, b2, w3, b3, f,
                 h1, h2, o);
        float res[T];
        for (int t = 0; t < T; t += V) {
            const vf dir = ld(o + t), mag = vexp(ld(o + T + t) * bc(exp_mult));
            vf step = pscale >= 0.0f ? dir * (bc(pscale) * mag) * bc(step_mult) : dir * mag * bc(step_mult);
            step = bc(lr_mult) * step;
            if (precond) step = step * (bc(1.0f) / vsqrt(ld(f + 6 * T + t) + bc(1e-6f)));
            const vf pv = ld(f + 2 * T + t); /* f[2]: p, f[6]: rms */
            stv(res + t, lr == 1.0f ? pv - step : pv - bc(lr) * step);
        }
        store_tile(out + i, res, n);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Exported: whole tensors, split over threads (see the top of the file). Each checks its arguments and
 * returns LOPT_OK, or an error code without touching memory (kernels/cpu/build.py ERRORS says what each
 * means): the passes read 3 momentum decays (interleaved), 1 rms decay and 3 Adafactor decays per element,
 * row / column factor arrays of 3, and hidden layers up to MAXH wide. */
enum { LOPT_OK = 0, LOPT_ENULL = -1, LOPT_ESIZE = -2, LOPT_ESLOTS = -3, LOPT_EHIDDEN = -4, LOPT_EDECAYS = -5 };

/* The layout of n elements whose row / column arrays drop the axes (sta, sa) / (stb, sb) (stride, size): both
 * blocks st * s must tile the n elements (a contiguous tensor's axes do). */
static int check_shape(int64_t n, int nslots, int64_t sta, int64_t sa, int64_t stb, int64_t sb, layout_t *L) {
    if (n < 0 || sta < 1 || sa < 1 || stb < 1 || sb < 1) return LOPT_ESIZE;
    if (sta > INT64_MAX / sa || stb > INT64_MAX / sb || n % (sta * sa) != 0 || n % (stb * sb) != 0)
        return LOPT_ESIZE;
    if (nslots < 1) return LOPT_ESLOTS;
    *L = (layout_t){{sta, sa}, {stb, sb}, n / sa, n / sb};
    return LOPT_OK;
}

static int check_decays(int nmom, int nrms, int nfac) {
    return nmom == 3 && nrms == 1 && nfac == 3 ? LOPT_OK : LOPT_EDECAYS;
}

/* Return LOPT_ENULL if any of the pointers is NULL. */
#define REQUIRE(...)                                                                                    \
    do {                                                                                                \
        const void *req_[] = {__VA_ARGS__};                                                             \
        for (size_t k_ = 0; k_ < sizeof req_ / sizeof req_[0]; k_++)                                    \
            if (!req_[k_]) return LOPT_ENULL;                                                           \
    } while (0)
#define TRY(expr)                                                                                       \
    do {                                                                                                \
        const int rc_ = (expr);                                                                         \
        if (rc_ != LOPT_OK) return rc_;                                                                 \
    } while (0)

int sfc_pass1(int64_t n, int nslots, int64_t sta, int64_t sa, int64_t stb, int64_t sb, int nmom, int nrms,
              int nfac, const float *p, const float *g, float *m, float *rms, const float *fa,
              const float *fb,
              const float *md, const float *mc, float rd, float rc, double *sums) {
    layout_t L;
    TRY(check_shape(n, nslots, sta, sa, stb, sb, &L));
    TRY(check_decays(nmom, nrms, nfac));
    REQUIRE(p, g, m, rms, fa, fb, md, mc, sums);
    PARALLEL_RANGES(n, nslots, pass1(sfc_features, 16, i0, i1, L, p, g, m, rms, fa, fb, md, mc, rd, rc,
                                     sums + 16 * j, NULL));
    return LOPT_OK;
}

int sfc_pass2(int64_t n, int nslots, int64_t sta, int64_t sa, int64_t stb, int64_t sb, int nmom, int nrms,
              int nfac, int H, const float *p, const float *g, const float *m, const float *rms,
              const float *fa, const float *fb, const float *we, const float *a0t, const float *a1t,
              const float *w2, const float *b2, const float *w3, const float *b3, float exp_mult,
              float step_mult, float scale, float lr, float *out) {
    layout_t L;
    TRY(check_shape(n, nslots, sta, sa, stb, sb, &L));
    TRY(check_decays(nmom, nrms, nfac));
    if (H < 1 || H > MAXH) return LOPT_EHIDDEN;
    REQUIRE(p, g, m, rms, fa, fb, we, a0t, a1t, w2, b2, w3, b3, out);
    PARALLEL_RANGES(n, nslots, sfc_pass2_range(i0, i1, L, H, p, g, m, rms, fa, fb, we, a0t, a1t, w2, b2,
                                               w3, b3, exp_mult, step_mult, scale, lr, out));
    return LOPT_OK;
}

int gsq_sums(int64_t n, int nslots, int64_t sta, int64_t sa, int64_t stb, int64_t sb, const float *g,
             double *rows, double *cols) {
    layout_t L;
    TRY(check_shape(n, nslots, sta, sa, stb, sb, &L));
    REQUIRE(g, rows, cols);
    PARALLEL_RANGES(n, nslots, gsq_range(i0, i1, L, g, rows + L.na * j, cols + L.nb * j));
    return LOPT_OK;
}

/* stats may be NULL: no LSTM statistics (Celo, whose LSTM reads only global inputs). */
int velo_pass1(int64_t n, int nslots, int64_t sta, int64_t sa, int64_t stb, int64_t sb, int nmom, int nrms,
               int nfac, const float *p, const float *g, float *m, float *rms, const float *fa,
               const float *fb, const float *md,
               const float *mc, float rd, float rc, double *sums, double *stats) {
    layout_t L;
    TRY(check_shape(n, nslots, sta, sa, stb, sb, &L));
    TRY(check_decays(nmom, nrms, nfac));
    REQUIRE(p, g, m, rms, fa, fb, md, mc, sums);
    PARALLEL_RANGES(n, nslots, pass1(velo_features, 18, i0, i1, L, p, g, m, rms, fa, fb, md, mc, rd, rc,
                                     sums + 18 * j, stats ? stats + 9 * j : NULL));
    return LOPT_OK;
}

int velo_pass2(int64_t n, int nslots, int64_t sta, int64_t sa, int64_t stb, int64_t sb, int nmom, int nrms,
               int nfac, int H, const float *p, const float *g, const float *m, const float *rms,
               const float *fa, const float *fb, const float *we, const float *a0t, const float *a1t,
               const float *w2, const float *b2, const float *w3, const float *b3, float exp_mult,
               float step_mult, float pscale, float lr_mult, int precond, float lr, float *out) {
    layout_t L;
    TRY(check_shape(n, nslots, sta, sa, stb, sb, &L));
    TRY(check_decays(nmom, nrms, nfac));
    if (H < 1 || H > MAXH) return LOPT_EHIDDEN;
    REQUIRE(p, g, m, rms, fa, fb, we, a0t, a1t, w2, b2, w3, b3, out);
    PARALLEL_RANGES(n, nslots, velo_pass2_range(i0, i1, L, H, p, g, m, rms, fa, fb, we, a0t, a1t, w2, b2,
                                                w3, b3, exp_mult, step_mult, pscale, lr_mult, precond, lr,
                                                out));
    return LOPT_OK;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Celo-Adam (celo_adam._single_tensor_celo_adam), element-wise over elements [i0, i1): g clipped to
 * [-1000, 1000] (torch.clamp: NaN stays), the momentum (nmom decays) and rms (nrms decays) accumulators
 * updated as accumulators.momentum_update / rms_update (slots interleaved, (1 - d) precomputed as torch does),
 * then celo_adam.adam_step on the last slots: step = (m / c1) * (lr / (eps + sqrt(v / c2 + 1e-10))) * scale
 * and out = p - glr * step (c1 = c2 = 1 without bias correction, scale = 1 without param_scale_mult,
 * glr = 1 for the reference's p - step: each exact in float32). No FMA contraction, IEEE sqrt and division:
 * the accumulators are the reference's bit for bit; the step differs only where torch's vectorised sqrt
 * rounds otherwise (it is not correctly rounded: 0.55 ulp on AVX-512), about 1e-7 relative. */
EXACT_FN static void celo_adam_range(int64_t i0, int64_t i1, int nmom, int nrms, const float *p,
                                     const float *restrict g, float *restrict m, float *restrict v,
                                     const float *md, const float *mc, const float *rd, const float *rc,
                                     float c1, float c2, float lr, float eps, float scale, float glr,
                                     float *out) {
    EXACT_BODY
    int64_t e0 = i0;
    if (nmom == 1 && nrms == 1) { /* the published configuration: vectors of V elements, then the tail */
        const float md0 = md[0], mc0 = mc[0], rd0 = rd[0], rc0 = rc[0];
        for (; e0 + V <= i1; e0 += V) {
            const vf x = ld(g + e0), lo = bc(-1000.0f), hi = bc(1000.0f);
            const vi below = x < lo, above = x > hi; /* NaN: neither */
            vf gi = (vf)(((vi)x & ~above) | ((vi)hi & above));
            gi = (vf)(((vi)gi & ~below) | ((vi)lo & below));
            const vf mi = bc(md0) * ld(m + e0) + bc(mc0) * gi;
            const vf vi_ = bc(rd0) * ld(v + e0) + bc(rc0) * (gi * gi);
            stv(m + e0, mi);
            stv(v + e0, vi_);
            const vf q = bc(lr) / (bc(eps) + vsqrt(vi_ / bc(c2) + bc(1e-10f)));
            stv(out + e0, ld(p + e0) - bc(glr) * (((mi / bc(c1)) * q) * bc(scale)));
        }
        for (int64_t e = e0; e < i1; e++) {
            const float x = g[e], gi = x < -1000.0f ? -1000.0f : (x > 1000.0f ? 1000.0f : x);
            const float mi = md0 * m[e] + mc0 * gi, vi = rd0 * v[e] + rc0 * (gi * gi);
            m[e] = mi;
            v[e] = vi;
            const float step = ((mi / c1) * (lr / (eps + sqrtf(vi / c2 + 1e-10f)))) * scale;
            out[e] = p[e] - glr * step;
        }
        return;
    }
    for (int64_t e = e0; e < i1; e++) {
        const float x = g[e], gi = x < -1000.0f ? -1000.0f : (x > 1000.0f ? 1000.0f : x);
        float *me = m + (int64_t)nmom * e, *ve = v + (int64_t)nrms * e;
        for (int k = 0; k < nmom; k++) me[k] = md[k] * me[k] + mc[k] * gi;
        for (int k = 0; k < nrms; k++) ve[k] = rd[k] * ve[k] + rc[k] * (gi * gi);
        const float mi = me[nmom - 1], vi = ve[nrms - 1];
        const float step = ((mi / c1) * (lr / (eps + sqrtf(vi / c2 + 1e-10f)))) * scale;
        out[e] = p[e] - glr * step;
    }
}

/* ncol: 1 (element-wise); nmom / nrms >= 1 slots per element; out may alias p. */
int celo_adam_step(int64_t n, int nslots, int64_t ncol, int nmom, int nrms, const float *p, const float *g,
                   float *m, float *v, const float *md, const float *mc, const float *rd, const float *rc,
                   float c1, float c2, float lr, float eps, float scale, float glr, float *out) {
    layout_t L; /* element-wise: no row / column arrays */
    if (ncol != 1) return LOPT_ESIZE;
    TRY(check_shape(n, nslots, 1, 1, 1, 1, &L));
    if (nmom < 1 || nrms < 1) return LOPT_EDECAYS;
    REQUIRE(p, g, m, v, md, mc, rd, rc, out);
    PARALLEL_RANGES(n, nslots, celo_adam_range(i0, i1, nmom, nrms, p, g, m, v, md, mc, rd, rc, c1, c2, lr, eps,
                                               scale, glr, out));
    return LOPT_OK;
}
