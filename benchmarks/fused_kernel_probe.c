/* The pairwise Rényi step in one call, for the probe of benchmarks/fused_kernel_probe.py.
 *
 * The direct form: per sample, every student's log-softmax, then per ordered pair (j, k) one exp of
 * the mixture alpha*logp_j + (1 - alpha)*logp_k, whose normaliser gives both the loss term and the
 * target share. K*K*C exps per sample, no intermediate tensor, no call per operation.
 * logits: B*K*C (by sample), grads: B*K*C, loss_sums: K (summed over the batch, before the
 * 1/((K-1)(alpha-1)B) factor), work: 2*K*C + C floats. Built with -ffast-math (so that gcc calls
 * glibc's vectorised expf): the coordinator refuses non-finite logits, and no infinity is used here.
 */
#include <math.h>

void renyi_direct(const float *logits, int batch, int k, int classes, float alpha, float inv_temperature,
                  float scale, float *grads, double *loss_sums, float *work) {
    float *logp = work, *probs = work + k * classes, *mix = work + 2 * k * classes;
    for (int s = 0; s < k; s++) loss_sums[s] = 0.0;
    for (int b = 0; b < batch; b++) {
        const float *z = logits + (long)b * k * classes;
        float *g = grads + (long)b * k * classes;
        for (int s = 0; s < k; s++) {
            float *l = logp + s * classes, *q = probs + s * classes, top = z[s * classes] * inv_temperature, total = 0.f;
            for (int c = 0; c < classes; c++) { l[c] = z[s * classes + c] * inv_temperature; top = l[c] > top ? l[c] : top; }
            for (int c = 0; c < classes; c++) { q[c] = expf(l[c] - top); total += q[c]; }
            float normaliser = top + logf(total), inverse = 1.f / total;
            for (int c = 0; c < classes; c++) { l[c] -= normaliser; q[c] *= inverse; }
        }
        for (int s = 0; s < k; s++) {
            float *gs = g + s * classes;
            for (int c = 0; c < classes; c++) gs[c] = 0.f;
            for (int j = 0; j < k; j++) {
                if (j == s) continue;
                float top = alpha * logp[j * classes] + (1.f - alpha) * logp[s * classes], total = 0.f;
                for (int c = 0; c < classes; c++) {
                    mix[c] = alpha * logp[j * classes + c] + (1.f - alpha) * logp[s * classes + c];
                    top = mix[c] > top ? mix[c] : top;
                }
                for (int c = 0; c < classes; c++) { mix[c] = expf(mix[c] - top); total += mix[c]; }
                loss_sums[s] += (double)(top + logf(total));
                float inverse = 1.f / total;
                for (int c = 0; c < classes; c++) gs[c] += mix[c] * inverse;
            }
            float peers = 1.f / (k - 1);
            for (int c = 0; c < classes; c++) gs[c] = (probs[s * classes + c] - gs[c] * peers) * scale;
        }
    }
}
