/* The factored pairwise Rényi step of rdml_dist/divergence.py in few calls, on the CPU in float32.
 *
 * Two forms (rdml_dist/kernels/native.py and divergence.py choose):
 * - whole_step: the whole step, both matrix products included, LANES samples at a time side by
 *   side in the vector lanes. For small cohorts and few classes, where per-sample loops would be a
 *   few elements long and torch's calls and bmm cost more than the arithmetic.
 * - factors_pass and weights_pass: the element-wise passes on either side of torch's first bmm
 *   (its BLAS is better at larger shapes than loops here): one call each per block of samples
 *   instead of one torch call per operation.
 * Both flag each sample with an untrusted overlap (below the floor, or not finite) and return how
 * many there are: the caller recomputes those samples by its careful path, and adds their losses
 * (the sums here leave them out).
 * Built for several x86-64 vector widths in one binary (target_clones, chosen at load by the CPU), so the
 * loops run in the widest vectors the machine has; exp and log are short polynomials written here,
 * vectorised with the loops (libm's scalar calls would not be), within a few ulp.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The clones differ in vector width only: the build turns off the fusing of multiplies and adds
 * (setup.py: -ffp-contract=off), so every clone rounds alike and a step's results are the same bits
 * on every x86-64 CPU. (GCC >= 6 and clang >= 14 know these names.) */
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 6))
#define WIDEST_VECTORS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define WIDEST_VECTORS
#endif
#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline)) /* into each clone, with its vectors */
#else
#define INLINE static inline
#endif

/* The smallest argument the factors' exp is given: e^x stays a normal number (as in
 * _saturating_exp_: subnormal results would make every later pass slow, and are negligible). */
#define LOWEST_EXP_ARGUMENT (-87.3365448f + 1.0f)

/* e^x for x in [LOWEST_EXP_ARGUMENT, 0] (the callers clamp): 2^n e^r with r = x - n ln2 in
 * [-ln2/2, ln2/2], a degree-7 polynomial for e^r (Cephes' expf coefficients), 2^n from its bits. */
INLINE float exp_of_nonpositive(float x) {
    const float round_bias = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, kept in the low bits */
    float biased = x * 1.44269504088896341f + round_bias;
    float n = biased - round_bias;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f; /* ln 2 in two parts (Cody-Waite) */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits;
    memcpy(&bits, &biased, sizeof bits);
    uint32_t power_bits = (bits - 0x4B400000u + 127u) << 23; /* n in [-126, 0]: a normal 2^n */
    float power;
    memcpy(&power, &power_bits, sizeof power);
    return p * power;
}

/* log x for a positive normal x (smaller or non-finite overlaps are untrusted, and what this gives
 * for them is not used): x = m 2^e with m in [sqrt(1/2), sqrt(2)), Cephes' logf polynomial. */
INLINE float log_of_positive(float x) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    int32_t exponent = ((bits >> 23) & 0xff) - 127;
    int32_t mantissa_bits = (bits & 0x007fffff) | 0x3f800000;
    float m;
    memcpy(&m, &mantissa_bits, sizeof m);
    int32_t above = m > 1.41421356f;
    m = above ? m * 0.5f : m;
    float e = (float)(exponent + above);
    float f = m - 1.0f, f2 = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * f2 - e * 2.12194440e-4f - 0.5f * f2;
    return f + y + e * 0.693359375f;
}


/* A K x K matrix transposed in place (torch's bmm is several times slower on a transposed view). */
INLINE void transpose_square(float *matrix, int k) {
    for (int j = 0; j < k; j++)
        for (int s = j + 1; s < k; s++) {
            float kept = matrix[(long)j * k + s];
            matrix[(long)j * k + s] = matrix[(long)s * k + j];
            matrix[(long)s * k + j] = kept;
        }
}

/* A factor's logits are on_logit * z + on_difference * (z - m), m the cohort's mean logit: the peer's
 * z/tau - (1-alpha)/tau (z - m), the own (1-alpha)/tau (z - m). Written so, with the small difference
 * z - m taken first, a peer's and an own logit add up to (alpha z_j + (1-alpha) z_k)/tau to within a
 * rounding of their own size, not of the alpha z and (1-alpha) m that cancel in them. */
typedef struct {
    float peer_on_logit, peer_on_difference, own_on_logit, own_on_difference;
} FactorWeights;

typedef struct {
    double alpha; /* in double: the losses' terms cancel, then are divided by alpha - 1 */
    float scale, trusted_floor;
} WeightTerms;

/* loss_sums[s] += sum over j != s of logZ_js, with logZ_js = log Z_js + u_j + v_s, u_j = p_j - alpha
 * lse_j, v_s = o_s - (1 - alpha) lse_s and lse_s = log Z_ss + p_s + o_s (p, o: the peer and own
 * factors' row shifts). From columns[s] = sum over j of log Z_js and diagonal[s] = log Z_ss. */
INLINE void add_losses(const double *columns, const double *diagonal, const float *peer_shift, const float *own_shift, int k,
                       double alpha, double *loss_sums) {
    double peer_part_sum = 0.0;
    for (int j = 0; j < k; j++) peer_part_sum += (double)peer_shift[j] - alpha * (diagonal[j] + peer_shift[j] + own_shift[j]);
    for (int s = 0; s < k; s++) {
        double own_lse = diagonal[s] + peer_shift[s] + own_shift[s];
        double peer_part = (double)peer_shift[s] - alpha * own_lse, own_part = (double)own_shift[s] - (1.0 - alpha) * own_lse;
        loss_sums[s] += (columns[s] - diagonal[s]) + (peer_part_sum - peer_part) + (k - 1) * own_part;
    }
}

/* ---- One sample at a time: the passes around torch's bmm ---- */

/* One factor row, up to its exp: its logits (FactorWeights), shifted by their maximum (returned)
 * and clamped, so that the exp of the whole sample runs as one long loop. */
INLINE float factor_row_exponents(const float *z, const float *mean, int classes, float on_logit, float on_difference,
                                  float *row) {
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int c = 0; c < classes; c++) {
        float value = on_logit * z[c] + on_difference * (z[c] - mean[c]);
        row[c] = value;
        top = value > top ? value : top;
    }
#pragma omp simd
    for (int c = 0; c < classes; c++) {
        float x = row[c] - top;
        row[c] = x < LOWEST_EXP_ARGUMENT ? LOWEST_EXP_ARGUMENT : x;
    }
    return top;
}

/* One sample's factors (z: K x C logits): the peer factors a_j into factors[0 : K*C], the own
 * factors s_k after them, their row shifts into shifts (peer then own, K each). mean (C floats) is
 * scratch: the K students' mean logit. */
INLINE void sample_factors(const float *z, int k, int classes, FactorWeights weights, float *factors, float *shifts,
                           float *mean) {
    long sample_size = (long)k * classes;
    float inverse_k = 1.0f / (float)k;
    memcpy(mean, z, classes * sizeof *mean);
    for (int s = 1; s < k; s++) {
#pragma omp simd
        for (int c = 0; c < classes; c++) mean[c] += z[(long)s * classes + c];
    }
#pragma omp simd
    for (int c = 0; c < classes; c++) mean[c] *= inverse_k;
    float *peer = factors, *own = factors + sample_size;
    for (int s = 0; s < k; s++) {
        const float *zs = z + (long)s * classes;
        shifts[s] = factor_row_exponents(zs, mean, classes, weights.peer_on_logit, weights.peer_on_difference,
                                         peer + (long)s * classes);
        shifts[k + s] = factor_row_exponents(zs, mean, classes, weights.own_on_logit, weights.own_on_difference,
                                             own + (long)s * classes);
    }
#pragma omp simd
    for (long i = 0; i < 2 * sample_size; i++) factors[i] = exp_of_nonpositive(factors[i]);
}

/* One sample's overlaps Z (K x K, row j: peer j) into the transposed gradient weights V^T, in place
 * (V_kk = scale / Z_kk, V_jk = -scale / ((K-1) Z_jk)), and with targets (not NULL) the transposed
 * target weights (1 / ((K-1) Z_jk) off the diagonal, 0 on it); adds the sample's losses
 * (add_losses; shifts: peer then own). Returns 1, adding nothing, if an overlap is untrusted.
 * logs (2K doubles) is scratch. */
INLINE int sample_weights(float *z, int k, const float *shifts, WeightTerms terms, float *targets, double *loss_sums,
                          double *logs) {
    float off_diagonal = -terms.scale / (float)(k - 1), peer_share = 1.0f / (float)(k - 1);
    double *columns = logs, *diagonal = logs + k;
    int below = 0;
    for (int s = 0; s < k; s++) columns[s] = 0.0;
    for (int j = 0; j < k; j++) {
        float *zj = z + (long)j * k, own_overlap = zj[j];
        diagonal[j] = log_of_positive(own_overlap);
        if (targets != NULL) {
            float *tj = targets + (long)j * k;
#pragma omp simd
            for (int s = 0; s < k; s++) tj[s] = peer_share / zj[s];
            tj[j] = 0.0f;
        }
#pragma omp simd reduction(+ : below)
        for (int s = 0; s < k; s++) {
            float value = zj[s];
            below += !(value >= terms.trusted_floor);
            columns[s] += (double)log_of_positive(value);
            zj[s] = off_diagonal / value;
        }
        zj[j] = terms.scale / own_overlap;
    }
    if (below) return 1;
    add_losses(columns, diagonal, shifts, shifts + k, k, terms.alpha, loss_sums);
    transpose_square(z, k);
    if (targets != NULL) transpose_square(targets, k);
    return 0;
}

/* ---- LANES samples at a time, one in each vector lane: the whole step ---- */

/* With the samples in the lanes every operation is a full vector whatever K and C are. Arrays are
 * [...][LANES]; the unused lanes of a last, short group repeat its first sample. */
#define LANES 16
#define LANE(array, index) ((array) + (long)(index) * LANES)

/* The matrix products' sums as vector values (GCC's vector extension: one register where the CPU
 * has 16 floats, split in two or four where it has fewer), so that they stay in registers; may_alias:
 * they load and store the float arrays themselves. */
typedef float Lanes __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float)), may_alias));
#define load_lanes(from) (*(const Lanes *)(from))
#define store_lanes(to, value) (*(Lanes *)(to) = (value))

typedef struct {
    float *logits, *factors, *mean, *shifts, *overlap, *weights, *target_weights;
    double *columns, *diagonal;
} LaneScratch;

/* Samples first .. first+count-1 (count <= LANES) into the lanes. */
INLINE void gather_lanes(const float *logits, long first, int count, long sample_size, float *lanes) {
    for (int l = 0; l < LANES; l++) {
        const float *sample = logits + (first + (l < count ? l : 0)) * sample_size;
        for (long i = 0; i < sample_size; i++) lanes[i * LANES + l] = sample[i];
    }
}

/* The factors of LANES samples (as sample_factors): factors [2K][C][LANES], shifts [2K][LANES];
 * mean ([C][LANES]) is scratch. */
INLINE void lane_factors(const float *z, int k, int classes, FactorWeights weights, float *mean, float *factors,
                         float *shifts) {
    float inverse_k = 1.0f / (float)k;
    for (int c = 0; c < classes; c++) {
        float *m = LANE(mean, c);
#pragma omp simd
        for (int l = 0; l < LANES; l++) m[l] = 0.0f;
        for (int s = 0; s < k; s++) {
            const float *zs = LANE(z, (long)s * classes + c);
#pragma omp simd
            for (int l = 0; l < LANES; l++) m[l] += zs[l];
        }
#pragma omp simd
        for (int l = 0; l < LANES; l++) m[l] *= inverse_k;
    }
    for (int row = 0; row < 2 * k; row++) {
        int s = row % k;
        float on_logit = row < k ? weights.peer_on_logit : weights.own_on_logit;
        float on_difference = row < k ? weights.peer_on_difference : weights.own_on_difference;
        float *top = LANE(shifts, row);
#pragma omp simd
        for (int l = 0; l < LANES; l++) top[l] = -INFINITY;
        for (int c = 0; c < classes; c++) {
            const float *zc = LANE(z, (long)s * classes + c), *m = LANE(mean, c);
            float *value = LANE(factors, (long)row * classes + c);
#pragma omp simd
            for (int l = 0; l < LANES; l++) {
                value[l] = on_logit * zc[l] + on_difference * (zc[l] - m[l]);
                top[l] = value[l] > top[l] ? value[l] : top[l];
            }
        }
        for (int c = 0; c < classes; c++) {
            float *value = LANE(factors, (long)row * classes + c);
#pragma omp simd
            for (int l = 0; l < LANES; l++) {
                float x = value[l] - top[l];
                value[l] = exp_of_nonpositive(x < LOWEST_EXP_ARGUMENT ? LOWEST_EXP_ARGUMENT : x);
            }
        }
    }
}

/* Z_js = sum over c of a_jc s_sc, per lane ([K][K][LANES]): four own rows at a time, so that four
 * independent sums hide the multiply-add's latency (a short last group repeats its last row). */
INLINE void lane_overlaps(const float *factors, int k, int classes, float *overlap) {
    const float *own = factors + (long)k * classes * LANES;
    for (int j = 0; j < k; j++)
        for (int first = 0; first < k; first += 4) {
            const float *rows[4];
            for (int i = 0; i < 4; i++) rows[i] = LANE(own, (long)(first + i < k ? first + i : k - 1) * classes);
            Lanes sums[4] = {{0}};
            for (int c = 0; c < classes; c++) {
                Lanes a = load_lanes(LANE(factors, (long)j * classes + c));
                for (int i = 0; i < 4; i++) sums[i] += a * load_lanes(LANE(rows[i], c));
            }
            for (int i = 0; i < 4 && first + i < k; i++) store_lanes(LANE(overlap, (long)j * k + first + i), sums[i]);
        }
}

/* As sample_weights, per lane: the transposed gradient and target weights ([s][j][LANES]), the
 * sums over j of log Z_js (columns, [K][LANES]) and log Z_ss (diagonal); below[l] counts lane l's
 * untrusted overlaps. */
INLINE void lane_weights(const float *overlap, int k, WeightTerms terms, float *gradient_weights, float *target_weights,
                         double *columns, double *diagonal, int *below) {
    float off_diagonal = -terms.scale / (float)(k - 1), peer_share = 1.0f / (float)(k - 1);
    for (long i = 0; i < (long)k * LANES; i++) columns[i] = 0.0;
    for (int l = 0; l < LANES; l++) below[l] = 0;
    for (int j = 0; j < k; j++)
        for (int s = 0; s < k; s++) {
            const float *z = LANE(overlap, (long)j * k + s);
            float *v = LANE(gradient_weights, (long)s * k + j), numerator = j == s ? terms.scale : off_diagonal;
            double *column = LANE(columns, s);
#pragma omp simd
            for (int l = 0; l < LANES; l++) {
                below[l] += !(z[l] >= terms.trusted_floor);
                float log_z = log_of_positive(z[l]);
                column[l] += (double)log_z;
                v[l] = numerator / z[l];
            }
            if (j == s) {
                double *d = LANE(diagonal, s);
#pragma omp simd
                for (int l = 0; l < LANES; l++) d[l] = log_of_positive(z[l]);
            }
            if (target_weights != NULL) {
                float *t = LANE(target_weights, (long)s * k + j), share = j == s ? 0.0f : peer_share;
#pragma omp simd
                for (int l = 0; l < LANES; l++) t[l] = share / z[l];
            }
        }
}

/* Lane l's sample into its K x C rows of out: s_s * sum over j of W_js a_j, from the transposed
 * weights ([s][j][LANES]); four classes at a time, as in lane_overlaps. */
INLINE void lane_weighted_sums(const float *factors, const float *weights, int k, int classes, long first, int count,
                               float *out) {
    const float *own = factors + (long)k * classes * LANES;
    long sample_size = (long)k * classes;
    for (int s = 0; s < k; s++)
        for (int from = 0; from < classes; from += 4) {
            int columns[4];
            for (int i = 0; i < 4; i++) columns[i] = from + i < classes ? from + i : classes - 1;
            Lanes sums[4] = {{0}};
            for (int j = 0; j < k; j++) {
                Lanes w = load_lanes(LANE(weights, (long)s * k + j));
                const float *row = LANE(factors, (long)j * classes);
                for (int i = 0; i < 4; i++) sums[i] += w * load_lanes(LANE(row, columns[i]));
            }
            for (int i = 0; i < 4 && from + i < classes; i++) {
                float values[LANES];
                store_lanes(values, sums[i] * load_lanes(LANE(own, (long)s * classes + columns[i])));
                for (int l = 0; l < count; l++) out[(first + l) * sample_size + (long)s * classes + columns[i]] = values[l];
            }
        }
}

/* The losses of the used lanes whose sample is trusted (add_losses per lane; scratch holds 2K
 * doubles and 2K floats). */
INLINE void lane_losses(const LaneScratch *lanes, int k, int count, const unsigned char *untrusted, double alpha,
                        double *loss_sums, double *scratch) {
    double *columns = scratch, *diagonal = scratch + k;
    float *shifts = (float *)(scratch + 2 * k);
    for (int l = 0; l < count; l++) {
        if (untrusted[l]) continue;
        for (int s = 0; s < k; s++) {
            columns[s] = lanes->columns[(long)s * LANES + l];
            diagonal[s] = lanes->diagonal[(long)s * LANES + l];
        }
        for (int i = 0; i < 2 * k; i++) shifts[i] = lanes->shifts[(long)i * LANES + l];
        add_losses(columns, diagonal, shifts, shifts + k, k, alpha, loss_sums);
    }
}

WIDEST_VECTORS
static int whole_step(const float *logits, int rows, int k, int classes, FactorWeights factor_weights, WeightTerms terms,
                      float *grads, float *targets, double *loss_sums, unsigned char *flags, LaneScratch lanes,
                      double *scratch) {
    long sample_size = (long)k * classes;
    int untrusted = 0, below[LANES];
    for (long first = 0; first < rows; first += LANES) {
        int count = rows - first < LANES ? (int)(rows - first) : LANES;
        gather_lanes(logits, first, count, sample_size, lanes.logits);
        lane_factors(lanes.logits, k, classes, factor_weights, lanes.mean, lanes.factors, lanes.shifts);
        lane_overlaps(lanes.factors, k, classes, lanes.overlap);
        lane_weights(lanes.overlap, k, terms, lanes.weights, targets == NULL ? NULL : lanes.target_weights, lanes.columns,
                     lanes.diagonal, below);
        for (int l = 0; l < count; l++) {
            flags[first + l] = below[l] != 0;
            untrusted += flags[first + l];
        }
        lane_losses(&lanes, k, count, flags + first, terms.alpha, loss_sums, scratch);
        lane_weighted_sums(lanes.factors, lanes.weights, k, classes, first, count, grads);
        if (targets != NULL) lane_weighted_sums(lanes.factors, lanes.target_weights, k, classes, first, count, targets);
    }
    return untrusted;
}

/* ---- The passes around torch's bmm ---- */

/* Rows shorter than this (classes) are computed in lanes by the factors pass, then scattered back. */
#define SHORT_ROWS 64

/* First: every sample's factors (logits rows x K x C; factors rows x 2 x K x C; shifts rows x 2K,
 * peer then own). lanes is scratch: C floats for long rows, LANES x (3 K C + C + 2 K) for short. */
WIDEST_VECTORS
static void factors_pass(const float *logits, int rows, int k, int classes, FactorWeights weights, float *factors,
                         float *shifts, float *lanes) {
    long sample_size = (long)k * classes;
    if (classes >= SHORT_ROWS) {
        for (int b = 0; b < rows; b++)
            sample_factors(logits + b * sample_size, k, classes, weights, factors + 2 * b * sample_size, shifts + 2L * b * k,
                           lanes);
        return;
    }
    float *z = lanes, *lane_factor = z + LANES * sample_size, *mean = lane_factor + 2 * LANES * sample_size;
    float *lane_shifts = mean + LANES * (long)classes;
    for (long first = 0; first < rows; first += LANES) {
        int count = rows - first < LANES ? (int)(rows - first) : LANES;
        gather_lanes(logits, first, count, sample_size, z);
        lane_factors(z, k, classes, weights, mean, lane_factor, lane_shifts);
        for (int l = 0; l < count; l++) {
            float *out = factors + 2 * (first + l) * sample_size, *shift = shifts + 2 * (first + l) * k;
            for (long i = 0; i < 2 * sample_size; i++) out[i] = lane_factor[i * LANES + l];
            for (int i = 0; i < 2 * k; i++) shift[i] = lane_shifts[(long)i * LANES + l];
        }
    }
}

/* Then, after Z = A S^T: every sample's overlaps (rows x K x K) into its transposed gradient
 * weights, ready for the second bmm; target_weights likewise, or NULL. untrusted[b] (one byte a
 * sample) says whether sample b's overlaps were untrusted; returns how many were. logs (2K doubles)
 * is scratch. */
WIDEST_VECTORS
static int weights_pass(float *overlap, int rows, int k, const float *shifts, WeightTerms terms, float *target_weights,
                        double *loss_sums, unsigned char *untrusted, double *logs) {
    int count = 0;
    for (int b = 0; b < rows; b++) {
        float *targets = target_weights == NULL ? NULL : target_weights + (long)b * k * k;
        untrusted[b] = (unsigned char)sample_weights(overlap + (long)b * k * k, k, shifts + 2L * b * k, terms, targets,
                                                     loss_sums, logs);
        count += untrusted[b];
    }
    return count;
}

/* ---- Python ----
 * The functions take the tensors' addresses (the caller, rdml_dist/kernels/native.py, checks dtype,
 * device, layout and sizes) and release the GIL while they run, as torch's own calls do. */

static PyObject *factors(PyObject *self, PyObject *args) {
    unsigned long long logits, factors_out, shifts;
    int rows, k, classes;
    FactorWeights weights;
    if (!PyArg_ParseTuple(args, "KiiiffffKK", &logits, &rows, &k, &classes, &weights.peer_on_logit,
                          &weights.peer_on_difference, &weights.own_on_logit, &weights.own_on_difference, &factors_out, &shifts))
        return NULL;
    size_t floats = classes >= SHORT_ROWS ? (size_t)classes : LANES * (3 * (size_t)k * classes + classes + 2 * (size_t)k);
    float *lanes = malloc(floats * sizeof *lanes);
    if (lanes == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    factors_pass((const float *)(uintptr_t)logits, rows, k, classes, weights, (float *)(uintptr_t)factors_out,
                 (float *)(uintptr_t)shifts, lanes);
    Py_END_ALLOW_THREADS
    free(lanes);
    Py_RETURN_NONE;
}

static PyObject *weights(PyObject *self, PyObject *args) {
    unsigned long long overlap, shifts, target_weights, loss_sums, untrusted_flags;
    int rows, k;
    WeightTerms terms;
    if (!PyArg_ParseTuple(args, "KiiKdffKKK", &overlap, &rows, &k, &shifts, &terms.alpha, &terms.scale, &terms.trusted_floor,
                          &target_weights, &loss_sums, &untrusted_flags))
        return NULL;
    double *logs = malloc(2 * (size_t)k * sizeof *logs);
    if (logs == NULL) return PyErr_NoMemory();
    int untrusted;
    Py_BEGIN_ALLOW_THREADS
    untrusted = weights_pass((float *)(uintptr_t)overlap, rows, k, (const float *)(uintptr_t)shifts, terms,
                             (float *)(uintptr_t)target_weights, (double *)(uintptr_t)loss_sums,
                             (unsigned char *)(uintptr_t)untrusted_flags, logs);
    Py_END_ALLOW_THREADS
    free(logs);
    return PyLong_FromLong(untrusted);
}

static PyObject *step(PyObject *self, PyObject *args) {
    unsigned long long logits, grads, targets, loss_sums, untrusted_flags, losses;
    int rows, k, classes;
    FactorWeights factor_weights;
    WeightTerms terms;
    if (!PyArg_ParseTuple(args, "KiiiffffdffKKKKK", &logits, &rows, &k, &classes, &factor_weights.peer_on_logit,
                          &factor_weights.peer_on_difference, &factor_weights.own_on_logit, &factor_weights.own_on_difference,
                          &terms.alpha, &terms.scale, &terms.trusted_floor, &grads, &targets, &loss_sums, &untrusted_flags,
                          &losses))
        return NULL;
    size_t sample_size = (size_t)k * classes, pairs = (size_t)k * k;
    size_t floats = LANES * (3 * sample_size + (size_t)classes + 2 * (size_t)k + 3 * pairs);
    size_t doubles = 2 * LANES * (size_t)k + 3 * (size_t)k; /* columns, diagonal; lane_losses' scratch */
    double *memory = malloc(doubles * sizeof(double) + floats * sizeof(float));
    if (memory == NULL) return PyErr_NoMemory();
    LaneScratch lanes;
    lanes.columns = memory;
    lanes.diagonal = lanes.columns + LANES * (size_t)k;
    double *scratch = lanes.diagonal + LANES * (size_t)k;
    lanes.logits = (float *)(memory + doubles);
    lanes.factors = lanes.logits + LANES * sample_size;
    lanes.mean = lanes.factors + 2 * LANES * sample_size;
    lanes.shifts = lanes.mean + LANES * (size_t)classes;
    lanes.overlap = lanes.shifts + 2 * LANES * (size_t)k;
    lanes.weights = lanes.overlap + LANES * pairs;
    lanes.target_weights = lanes.weights + LANES * pairs;
    int untrusted;
    Py_BEGIN_ALLOW_THREADS
    untrusted = whole_step((const float *)(uintptr_t)logits, rows, k, classes, factor_weights, terms, (float *)(uintptr_t)grads,
                           (float *)(uintptr_t)targets, (double *)(uintptr_t)loss_sums, (unsigned char *)(uintptr_t)untrusted_flags,
                           lanes, scratch);
    Py_END_ALLOW_THREADS
    free(memory);
    if (untrusted == 0) { /* the batch means, as the caller would divide (in double, then rounded) */
        double *sums = (double *)(uintptr_t)loss_sums, denominator = (double)(k - 1) * (terms.alpha - 1.0) * rows;
        for (int s = 0; s < k; s++) ((float *)(uintptr_t)losses)[s] = (float)(sums[s] / denominator);
    }
    return PyLong_FromLong(untrusted);
}

static PyMethodDef methods[] = {
    {"factors", factors, METH_VARARGS,
     "factors(logits, rows, k, classes, 4 factor weights, factors, shifts): the factors' exp and row shifts of a block "
     "of samples (addresses of float32 buffers)."},
    {"weights", weights, METH_VARARGS,
     "weights(overlap, rows, k, shifts, alpha, scale, trusted_floor, target_weights or 0, loss_sums, untrusted_flags) -> "
     "untrusted: the transposed gradient (and target) weights of a block, its losses' sums and each sample's flag."},
    {"step", step, METH_VARARGS,
     "step(logits, rows, k, classes, 4 factor weights, alpha, scale, trusted_floor, grads, targets or 0, loss_sums, "
     "untrusted_flags, losses) -> untrusted: the whole step of a batch, its matrix products included (and with no "
     "untrusted sample its batch-mean losses)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_renyi_passes", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__renyi_passes(void) { return PyModule_Create(&module); }
