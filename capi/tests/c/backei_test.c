/* The C ABI from C: built by the system C compiler against the static library (capi/tests/c_abi.rs
 * does that and runs it), linked with nothing but libc, libm, libdl and libpthread.
 *
 *   backei_test cpu    the CPU engine: a hand-computed plain layer, BPTT against a C twin of the
 *                      plain layer, a smooth BackEI layer's gradient against finite differences,
 *                      float against double, two forwards before their backwards, the errors
 *   backei_test cuda   the CUDA engine on a stream this program creates (the driver API through
 *                      dlopen, so no CUDA toolkit is needed to build it): every switch against
 *                      the CPU engine, from device memory this program owns
 *
 * Prints "N passed, M failed" and exits 1 on any failure. */
#include "backei.h"

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int passed, failed;

#define CHECK(cond, ...)                                                                         \
    do {                                                                                         \
        if (cond) {                                                                              \
            passed++;                                                                            \
        } else {                                                                                 \
            failed++;                                                                            \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                          \
            printf(__VA_ARGS__);                                                                 \
            printf("\n");                                                                        \
        }                                                                                        \
    } while (0)

#define OK(call)                                                                                 \
    do {                                                                                         \
        BackeiStatus st_ = (call);                                                               \
        CHECK(st_ == BACKEI_STATUS_OK, "%s -> %d: %s", #call, (int)st_, backei_last_error());   \
    } while (0)

/* A deterministic pseudo-random number in [lo, hi). */
static double rnd(unsigned *state, double lo, double hi) {
    *state = *state * 1664525u + 1013904223u;
    return lo + (hi - lo) * ((*state >> 8) / 16777216.0);
}

typedef struct {
    BackeiSizes sz;
    void *saved;
} Work;

static Work work_for(BackeiLayer *l, BackeiBatch b, BackeiDtype dt) {
    Work w;
    memset(&w, 0, sizeof w);
    OK(backei_workspace_size(l, b, dt, &w.sz));
    w.saved = malloc(w.sz.saved_bytes ? w.sz.saved_bytes : 1);
    return w;
}

static BackeiWorkspace host_ws(Work *w) {
    BackeiWorkspace ws = {w->saved, w->sz.saved_bytes, NULL, 0};
    return ws;
}

/* The plain layer by hand: input 0.45 everywhere, λ = 0.2, θ = 0.5: v = .45 (no spike, u = .45),
 * v = .54 (spike, u = 0), v = .45 (no spike). */
static void test_plain_known_answer(void) {
    BackeiLayerConfig c = backei_spiking_config(3);
    BackeiLayer *l = NULL;
    OK(backei_layer_create(&c, BACKEI_ENGINE_CPU, 0, &l));
    BackeiBatch b = {1, 3, 1}; /* B = 1, T = 3, T_in = 1 */
    Work w = work_for(l, b, BACKEI_DTYPE_F32);
    CHECK(w.sz.param_len == 0 && w.sz.input_len == 3 && w.sz.output_len == 9, "sizes %zu %zu %zu", w.sz.param_len,
          w.sz.input_len, w.sz.output_len);
    float x[3] = {0.45f, 0.45f, 0.45f}, s[9];
    OK(backei_forward_host_f32(l, b, x, NULL, s, host_ws(&w)));
    const float want[9] = {0, 0, 0, 1, 1, 1, 0, 0, 0};
    for (int i = 0; i < 9; i++) CHECK(s[i] == want[i], "s[%d] = %g, want %g", i, s[i], want[i]);
    free(w.saved);
    backei_layer_destroy(l);
}

/* The plain layer's BPTT written out in C (docs/model.md; rectangle surrogate of width 1):
 * dv_t = du_t (1 - o_t) + (ds_t - du_t v_t) H'(v_t - θ), du_{t-1} = λ dv_t, dI_t = dv_t. */
static void plain_twin(int T, int n, const double *x, const double *gout, double *s, double *gin) {
    double *v = calloc((size_t)T * n, sizeof(double));
    for (int i = 0; i < n; i++) {
        double u = 0;
        for (int t = 0; t < T; t++) {
            double vt = 0.2 * u + x[t * n + i];
            double o = vt > 0.5 ? 1 : 0;
            v[t * n + i] = vt;
            s[t * n + i] = o;
            u = vt * (1 - o);
        }
        double du = 0;
        for (int t = T - 1; t >= 0; t--) {
            double vt = v[t * n + i], o = vt > 0.5 ? 1 : 0;
            double h = fabs(vt - 0.5) < 0.5 ? 1 : 0;
            double dv = du * (1 - o) + (gout[t * n + i] - du * vt) * h;
            gin[t * n + i] = dv;
            du = 0.2 * dv;
        }
    }
    free(v);
}

static void test_plain_against_c_twin(void) {
    const int T = 6, B = 2, N = 5, n = B * N;
    BackeiLayerConfig c = backei_spiking_config(N);
    BackeiLayer *l = NULL;
    OK(backei_layer_create(&c, BACKEI_ENGINE_CPU, 0, &l));
    BackeiBatch b = {B, T, T};
    Work w = work_for(l, b, BACKEI_DTYPE_F64);
    double x[60], gout[60], s[60], gin[60], s_twin[60], gin_twin[60];
    unsigned st = 7;
    for (int i = 0; i < T * n; i++) x[i] = rnd(&st, 0.0, 0.9), gout[i] = rnd(&st, -1.0, 1.0);
    OK(backei_forward_host_f64(l, b, x, NULL, s, host_ws(&w)));
    OK(backei_backward_host_f64(l, b, x, NULL, s, gout, gin, NULL, host_ws(&w)));
    plain_twin(T, n, x, gout, s_twin, gin_twin);
    double err = 0;
    int fired = 0;
    for (int i = 0; i < T * n; i++) {
        CHECK(s[i] == s_twin[i], "s[%d] = %g, twin %g", i, s[i], s_twin[i]);
        err = fmax(err, fabs(gin[i] - gin_twin[i]));
        fired += s[i] != 0;
    }
    CHECK(err < 1e-12, "dI differs from the C twin by %g", err);
    CHECK(fired > 5 && fired < T * n - 5, "%d of %d fired: the case tests nothing", fired, T * n);
    free(w.saved);
    backei_layer_destroy(l);
}

/* L = Σ gout·s of a smooth BackEI layer (k = 4) in double. */
static double loss(BackeiLayer *l, BackeiBatch b, const double *x, const double *p, const double *gout, Work *w, double *s) {
    OK(backei_forward_host_f64(l, b, x, p, s, host_ws(w)));
    double sum = 0;
    for (size_t i = 0; i < w->sz.output_len; i++) sum += gout[i] * s[i];
    return sum;
}

static void test_smooth_gradients_against_finite_differences(void) {
    BackeiLayerConfig c = backei_backei_config(2, 4, 5);
    c.delay = 2;
    c.smooth_k = 4.0;
    BackeiLayer *l = NULL;
    OK(backei_layer_create(&c, BACKEI_ENGINE_CPU, 0, &l));
    BackeiBatch b = {2, 4, 4};
    Work w = work_for(l, b, BACKEI_DTYPE_F64);
    size_t ni = w.sz.input_len, no = w.sz.output_len, np = w.sz.param_len;
    CHECK(np == 2 * (2 * 2 * 9 + 2), "param_len %zu", np);
    double *x = malloc(ni * 8), *p = malloc(np * 8), *gout = malloc(no * 8), *s = malloc(no * 8);
    double *gin = malloc(ni * 8), *gp = calloc(np, 8);
    unsigned st = 11;
    for (size_t i = 0; i < ni; i++) x[i] = rnd(&st, 0.0, 1.2);
    for (size_t i = 0; i < np; i++) p[i] = rnd(&st, -0.5, 0.5);
    for (size_t i = 0; i < no; i++) gout[i] = rnd(&st, -1.0, 1.0);
    loss(l, b, x, p, gout, &w, s);
    OK(backei_backward_host_f64(l, b, x, p, s, gout, gin, gp, host_ws(&w)));
    const double h = 1e-6;
    double worst = 0;
    for (size_t i = 0; i < np; i += 3) {
        double keep = p[i];
        p[i] = keep + h;
        double up = loss(l, b, x, p, gout, &w, s);
        p[i] = keep - h;
        double down = loss(l, b, x, p, gout, &w, s);
        p[i] = keep;
        worst = fmax(worst, fabs((up - down) / (2 * h) - gp[i]) / fmax(1.0, fabs(gp[i])));
    }
    for (size_t i = 0; i < ni; i += 7) {
        double keep = x[i];
        x[i] = keep + h;
        double up = loss(l, b, x, p, gout, &w, s);
        x[i] = keep - h;
        double down = loss(l, b, x, p, gout, &w, s);
        x[i] = keep;
        worst = fmax(worst, fabs((up - down) / (2 * h) - gin[i]) / fmax(1.0, fabs(gin[i])));
    }
    CHECK(worst < 1e-6, "BPTT differs from central differences by %g", worst);
    free(x), free(p), free(gout), free(s), free(gin), free(gp), free(w.saved);
    backei_layer_destroy(l);
}

/* Two forwards, then their backwards in reverse order: the handle keeps no per-batch state. */
static void test_interleaved_batches(void) {
    BackeiLayerConfig c = backei_backei_config(3, 5, 5);
    BackeiLayer *l = NULL;
    OK(backei_layer_create(&c, BACKEI_ENGINE_CPU, 0, &l));
    BackeiBatch b1 = {2, 3, 3}, b2 = {1, 5, 1};
    Work w1 = work_for(l, b1, BACKEI_DTYPE_F32), w2 = work_for(l, b2, BACKEI_DTYPE_F32);
    size_t np = w1.sz.param_len;
    float *p = malloc(np * 4), *x1 = malloc(w1.sz.input_len * 4), *x2 = malloc(w2.sz.input_len * 4);
    float *s1 = malloc(w1.sz.output_len * 4), *s2 = malloc(w2.sz.output_len * 4);
    float *g1 = malloc(w1.sz.output_len * 4), *g2 = malloc(w2.sz.output_len * 4);
    float *d1 = malloc(w1.sz.input_len * 4), *d2 = malloc(w2.sz.input_len * 4);
    float *gp_a = calloc(np, 4), *gp_b = calloc(np, 4);
    unsigned st = 3;
    for (size_t i = 0; i < np; i++) p[i] = (float)rnd(&st, -0.4, 0.4);
    for (size_t i = 0; i < w1.sz.input_len; i++) x1[i] = (float)rnd(&st, 0.0, 1.0);
    for (size_t i = 0; i < w2.sz.input_len; i++) x2[i] = (float)rnd(&st, 0.0, 1.0);
    for (size_t i = 0; i < w1.sz.output_len; i++) g1[i] = (float)rnd(&st, -1.0, 1.0);
    for (size_t i = 0; i < w2.sz.output_len; i++) g2[i] = (float)rnd(&st, -1.0, 1.0);
    /* alone: forward and backward of batch 1 */
    OK(backei_forward_host_f32(l, b1, x1, p, s1, host_ws(&w1)));
    OK(backei_backward_host_f32(l, b1, x1, p, s1, g1, d1, gp_a, host_ws(&w1)));
    float *d1_alone = malloc(w1.sz.input_len * 4);
    memcpy(d1_alone, d1, w1.sz.input_len * 4);
    /* interleaved: forward 1, forward 2, backward 2, backward 1 */
    OK(backei_forward_host_f32(l, b1, x1, p, s1, host_ws(&w1)));
    OK(backei_forward_host_f32(l, b2, x2, p, s2, host_ws(&w2)));
    OK(backei_backward_host_f32(l, b2, x2, p, s2, g2, d2, gp_b, host_ws(&w2)));
    memset(gp_b, 0, np * 4);
    OK(backei_backward_host_f32(l, b1, x1, p, s1, g1, d1, gp_b, host_ws(&w1)));
    CHECK(memcmp(d1, d1_alone, w1.sz.input_len * 4) == 0, "dI of batch 1 changed when batch 2 ran in between");
    CHECK(memcmp(gp_a, gp_b, np * 4) == 0, "dW of batch 1 changed when batch 2 ran in between");
    /* gradients accumulate: a second backward adds the same again */
    OK(backei_backward_host_f32(l, b1, x1, p, s1, g1, d1, gp_b, host_ws(&w1)));
    double err = 0, norm = 0;
    for (size_t i = 0; i < np; i++) err = fmax(err, fabs(gp_b[i] - 2 * gp_a[i])), norm = fmax(norm, fabs(gp_a[i]));
    CHECK(norm > 0 && err <= 1e-6 * norm, "the second backward did not add its gradient (%g of %g)", err, norm);
    free(p), free(x1), free(x2), free(s1), free(s2), free(g1), free(g2), free(d1), free(d2), free(d1_alone);
    free(gp_a), free(gp_b), free(w1.saved), free(w2.saved);
    backei_layer_destroy(l);
}

static void test_errors(void) {
    BackeiLayerConfig c = backei_backei_config(2, 5, 5);
    BackeiLayer *l = NULL;
    BackeiSizes sz;
    BackeiBatch b = {1, 3, 3};
    CHECK(backei_workspace_size(NULL, b, BACKEI_DTYPE_F32, &sz) == BACKEI_STATUS_INVALID_ARGUMENT, "NULL layer");
    CHECK(strstr(backei_last_error(), "layer") != NULL, "message: %s", backei_last_error());
    c.radius = 3;
    CHECK(backei_layer_create(&c, BACKEI_ENGINE_CPU, 0, &l) == BACKEI_STATUS_CONFIG && l == NULL, "r = 3 on 5x5");
    CHECK(strstr(backei_last_error(), "radius") && strstr(backei_last_error(), "5×5"), "message: %s", backei_last_error());
    c.radius = 1;
    c.surrogate = 9;
    CHECK(backei_layer_create(&c, BACKEI_ENGINE_CPU, 0, &l) == BACKEI_STATUS_INVALID_ARGUMENT, "surrogate 9");
    CHECK(backei_layer_create(NULL, BACKEI_ENGINE_CPU, 0, &l) == BACKEI_STATUS_INVALID_ARGUMENT, "NULL config");
    c = backei_backei_config(2, 5, 5);
    c.delay = 0;
    CHECK(backei_layer_create(&c, BACKEI_ENGINE_CPU, 0, &l) == BACKEI_STATUS_CONFIG, "D = 0");
    c.delay = 1;
    OK(backei_layer_create(&c, BACKEI_ENGINE_CPU, 0, &l));
    BackeiBatch bad = {1, 3, 2};
    CHECK(backei_workspace_size(l, bad, BACKEI_DTYPE_F32, &sz) == BACKEI_STATUS_CONFIG, "T_in = 2 with T = 3");
    CHECK(strstr(backei_last_error(), "T_in = 2") != NULL, "message: %s", backei_last_error());
    Work w = work_for(l, b, BACKEI_DTYPE_F32);
    float *x = calloc(w.sz.input_len, 4), *p = calloc(w.sz.param_len, 4), *s = calloc(w.sz.output_len, 4);
    BackeiWorkspace small = {w.saved, w.sz.saved_bytes - 4, NULL, 0};
    CHECK(backei_forward_host_f32(l, b, x, p, s, small) == BACKEI_STATUS_INVALID_ARGUMENT, "saved workspace too small");
    CHECK(strstr(backei_last_error(), "saved_bytes") != NULL, "message: %s", backei_last_error());
    CHECK(backei_forward_host_f32(l, b, NULL, p, s, host_ws(&w)) == BACKEI_STATUS_INVALID_ARGUMENT, "NULL input");
    CHECK(backei_forward_cuda(l, NULL, b, x, p, s, host_ws(&w)) == BACKEI_STATUS_INVALID_ARGUMENT, "CUDA call on a CPU layer");
    OK(backei_forward_host_f32(l, b, x, p, s, host_ws(&w)));
    CHECK(backei_last_error()[0] == 0, "a successful call leaves an empty message: %s", backei_last_error());
    free(x), free(p), free(s), free(w.saved);
    backei_layer_destroy(l);
    backei_layer_destroy(NULL);
    /* CUDA: a layer, or (no GPU, no driver) an error that says why; never a crash */
    BackeiLayer *g = NULL;
    BackeiStatus st = backei_layer_create(&c, BACKEI_ENGINE_CUDA, 0, &g);
    CHECK(st == BACKEI_STATUS_OK || (st == BACKEI_STATUS_CUDA && strlen(backei_last_error()) > 10 && g == NULL),
          "CUDA create -> %d: %s", (int)st, backei_last_error());
    if (st != BACKEI_STATUS_OK) printf("(no CUDA here: %s)\n", backei_last_error());
    backei_layer_destroy(g);
}

static void test_f32_agrees_with_f64(void) {
    BackeiLayerConfig c = backei_backei_config(3, 6, 7);
    c.radius = 2;
    BackeiLayer *l = NULL;
    OK(backei_layer_create(&c, BACKEI_ENGINE_CPU, 0, &l));
    BackeiBatch b = {2, 5, 5};
    Work w32 = work_for(l, b, BACKEI_DTYPE_F32), w64 = work_for(l, b, BACKEI_DTYPE_F64);
    size_t ni = w32.sz.input_len, no = w32.sz.output_len;
    double *x = malloc(ni * 8), *s = malloc(no * 8);
    float *xf = malloc(ni * 4), *sf = malloc(no * 4);
    double p[2 * (9 * 25 + 3)];
    float pf[2 * (9 * 25 + 3)];
    unsigned st = 5;
    for (size_t i = 0; i < w32.sz.param_len; i++) pf[i] = (float)rnd(&st, -0.3, 0.3), p[i] = pf[i];
    for (size_t i = 0; i < ni; i++) xf[i] = (float)rnd(&st, 0.0, 1.5), x[i] = xf[i];
    OK(backei_forward_host_f64(l, b, x, p, s, host_ws(&w64)));
    OK(backei_forward_host_f32(l, b, xf, pf, sf, host_ws(&w32)));
    size_t differ = 0, fired = 0, inhibitory = 0;
    for (size_t i = 0; i < no; i++) differ += s[i] != sf[i], fired += s[i] != 0, inhibitory += s[i] < 0;
    CHECK(differ <= no / 500, "%zu of %zu spikes differ between float and double", differ, no);
    CHECK(fired > no / 20 && inhibitory > 0, "fired %zu, inhibitory %zu of %zu: the case tests nothing", fired, inhibitory, no);
    free(x), free(s), free(xf), free(sf), free(w32.saved), free(w64.saved);
    backei_layer_destroy(l);
}

/* ---- CUDA: the driver API through dlopen ---- */
typedef int (*cuInit_t)(unsigned);
typedef int (*cuDeviceGet_t)(int *, int);
typedef int (*cuPrimaryRetain_t)(void **, int);
typedef int (*cuCtxSetCurrent_t)(void *);
typedef int (*cuStreamCreate_t)(CUstream *, unsigned);
typedef int (*cuStreamSync_t)(CUstream);
typedef int (*cuStreamDestroy_t)(CUstream);
typedef int (*cuMemAlloc_t)(unsigned long long *, size_t);
typedef int (*cuMemFree_t)(unsigned long long);
typedef int (*cuMemcpyHtoD_t)(unsigned long long, const void *, size_t);
typedef int (*cuMemcpyDtoH_t)(void *, unsigned long long, size_t);
typedef int (*cuMemsetD8_t)(unsigned long long, unsigned char, size_t);

static struct {
    cuMemAlloc_t alloc;
    cuMemFree_t free;
    cuMemcpyHtoD_t htod;
    cuMemcpyDtoH_t dtoh;
    cuMemsetD8_t memset;
    cuStreamSync_t sync;
} cu;

static unsigned long long dev_copy(const void *host, size_t bytes) {
    unsigned long long d = 0;
    if (cu.alloc(&d, bytes ? bytes : 4) != 0) return 0;
    if (host) cu.htod(d, host, bytes);
    else cu.memset(d, 0, bytes ? bytes : 4);
    return d;
}

/* One configuration on the GPU (on `stream`) against the CPU engine, smooth (k = 4) so that f32
 * rounding cannot flip a spike: s, dI and dW within 1e-4 of the largest value. */
static void cuda_case(CUstream stream, const char *name, BackeiLayerConfig c, BackeiBatch b) {
    BackeiLayer *gl = NULL, *cl = NULL;
    OK(backei_layer_create(&c, BACKEI_ENGINE_CUDA, 0, &gl));
    OK(backei_layer_create(&c, BACKEI_ENGINE_CPU, 0, &cl));
    if (!gl || !cl) return;
    BackeiSizes sz;
    OK(backei_workspace_size(gl, b, BACKEI_DTYPE_F32, &sz));
    Work cw = work_for(cl, b, BACKEI_DTYPE_F32);
    size_t ni = sz.input_len, no = sz.output_len, np = sz.param_len;
    float *x = malloc(ni * 4), *p = malloc((np + 1) * 4), *g = malloc(no * 4);
    float *s_c = malloc(no * 4), *dx_c = malloc(ni * 4), *dp_c = calloc(np + 1, 4);
    float *s_g = malloc(no * 4), *dx_g = malloc(ni * 4), *dp_g = calloc(np + 1, 4);
    unsigned st = 17;
    for (size_t i = 0; i < ni; i++) x[i] = (float)rnd(&st, 0.0, 1.2);
    for (size_t i = 0; i < np; i++) p[i] = (float)rnd(&st, -0.3, 0.3);
    for (size_t i = 0; i < no; i++) g[i] = (float)rnd(&st, -1.0, 1.0);
    OK(backei_forward_host_f32(cl, b, x, p, s_c, host_ws(&cw)));
    OK(backei_backward_host_f32(cl, b, x, p, s_c, g, dx_c, np ? dp_c : NULL, host_ws(&cw)));
    unsigned long long dx = dev_copy(x, ni * 4), dpar = dev_copy(np ? p : NULL, np * 4), dg = dev_copy(g, no * 4);
    unsigned long long ds = dev_copy(NULL, no * 4), ddx = dev_copy(NULL, ni * 4), ddp = dev_copy(NULL, np * 4);
    unsigned long long saved = dev_copy(NULL, sz.saved_bytes), scratch = dev_copy(NULL, sz.scratch_bytes);
    BackeiWorkspace ws = {(void *)saved, sz.saved_bytes, (void *)scratch, sz.scratch_bytes};
    OK(backei_forward_cuda(gl, stream, b, (const float *)dx, np ? (const float *)dpar : NULL, (float *)ds, ws));
    OK(backei_backward_cuda(gl, stream, b, (const float *)dx, np ? (const float *)dpar : NULL, (const float *)ds,
                            (const float *)dg, (float *)ddx, np ? (float *)ddp : NULL, ws));
    CHECK(cu.sync(stream) == 0, "%s: the stream reported an error", name);
    cu.dtoh(s_g, ds, no * 4), cu.dtoh(dx_g, ddx, ni * 4);
    if (np) cu.dtoh(dp_g, ddp, np * 4);
    double es = 0, ex = 0, ep = 0, mx = 1e-30, mp = 1e-30;
    for (size_t i = 0; i < no; i++) es = fmax(es, fabs(s_g[i] - s_c[i]));
    for (size_t i = 0; i < ni; i++) ex = fmax(ex, fabs(dx_g[i] - dx_c[i])), mx = fmax(mx, fabs(dx_c[i]));
    for (size_t i = 0; i < np; i++) ep = fmax(ep, fabs(dp_g[i] - dp_c[i])), mp = fmax(mp, fabs(dp_c[i]));
    CHECK(es < 1e-4, "%s: s differs from the CPU engine by %g", name, es);
    CHECK(ex < 1e-4 * mx, "%s: dI differs by %g (max %g)", name, ex, mx);
    CHECK(np == 0 || ep < 1e-4 * mp, "%s: dW differs by %g (max %g)", name, ep, mp);
    printf("cuda %s: max |ds| %.2e, |dI| %.2e / %.2e, |dW| %.2e / %.2e\n", name, es, ex, mx, ep, mp);
    unsigned long long all[8] = {dx, dpar, dg, ds, ddx, ddp, saved, scratch};
    for (int i = 0; i < 8; i++) cu.free(all[i]);
    free(x), free(p), free(g), free(s_c), free(dx_c), free(dp_c), free(s_g), free(dx_g), free(dp_g), free(cw.saved);
    backei_layer_destroy(gl);
    backei_layer_destroy(cl);
}

static void test_cuda(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    CHECK(lib != NULL, "libcuda.so.1 not found: the CUDA test needs a GPU");
    if (!lib) return;
    cuInit_t init = (cuInit_t)dlsym(lib, "cuInit");
    cuDeviceGet_t dget = (cuDeviceGet_t)dlsym(lib, "cuDeviceGet");
    cuPrimaryRetain_t retain = (cuPrimaryRetain_t)dlsym(lib, "cuDevicePrimaryCtxRetain");
    cuCtxSetCurrent_t setcur = (cuCtxSetCurrent_t)dlsym(lib, "cuCtxSetCurrent");
    cuStreamCreate_t screate = (cuStreamCreate_t)dlsym(lib, "cuStreamCreate");
    cuStreamDestroy_t sdestroy = (cuStreamDestroy_t)dlsym(lib, "cuStreamDestroy_v2");
    cu.alloc = (cuMemAlloc_t)dlsym(lib, "cuMemAlloc_v2");
    cu.free = (cuMemFree_t)dlsym(lib, "cuMemFree_v2");
    cu.htod = (cuMemcpyHtoD_t)dlsym(lib, "cuMemcpyHtoD_v2");
    cu.dtoh = (cuMemcpyDtoH_t)dlsym(lib, "cuMemcpyDtoH_v2");
    cu.memset = (cuMemsetD8_t)dlsym(lib, "cuMemsetD8_v2");
    cu.sync = (cuStreamSync_t)dlsym(lib, "cuStreamSynchronize");
    int dev = 0;
    void *ctx = NULL;
    CUstream stream = NULL;
    CHECK(init(0) == 0 && dget(&dev, 0) == 0 && retain(&ctx, dev) == 0 && setcur(ctx) == 0, "CUDA init");
    CHECK(screate(&stream, 1 /* CU_STREAM_NON_BLOCKING */) == 0, "stream");
    BackeiBatch b = {3, 6, 6}, b1 = {3, 6, 1};
    BackeiLayerConfig c = backei_backei_config(4, 6, 7);
    c.smooth_k = 4.0;
    cuda_case(stream, "back+ei r1 D1", c, b);
    cuda_case(stream, "back+ei r1 D1 T_in=1", c, b1);
    c.radius = 2, c.delay = 2;
    cuda_case(stream, "back+ei r2 D2", c, b);
    c.radius = 1, c.delay = 1, c.ei = false;
    cuda_case(stream, "back only", c, b);
    c.back = false, c.ei = true;
    cuda_case(stream, "ei only", c, b);
    BackeiLayerConfig plain = backei_spiking_config(37);
    plain.smooth_k = 4.0;
    cuda_case(stream, "plain", plain, b);
    sdestroy(stream);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "cpu";
    if (strcmp(mode, "cuda") == 0) {
        test_cuda();
    } else {
        test_plain_known_answer();
        test_plain_against_c_twin();
        test_smooth_gradients_against_finite_differences();
        test_interleaved_batches();
        test_f32_agrees_with_f64();
        test_errors();
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
