"""Plain reference implementations written from the formulas in METHOD.md.

They loop over rows and classes (small sizes only) and let autograd differentiate them, so
they share nothing with the closed-form kernels under test.
"""

import math

import torch


def _bce(z, y):
    # BCE with logits, written out: -(y log p + (1 - y) log(1 - p)) in a stable form
    return torch.clamp(z, min=0) - z * y + torch.log1p(torch.exp(-torch.abs(z)))


def sigmoid_eql(z, t, ratio, gamma=12.0, mu=0.8, alpha=4.0, ignore_index=-100):
    """sum_nj [q_j y + r_j (1 - y)] BCE / N over C+1 columns (last = background, weight 1)."""
    n, k = z.shape
    c = k - 1
    r = 1 / (1 + torch.exp(-gamma * (ratio - mu)))
    q = 1 + alpha * (1 - r)
    total, rows = 0.0, 0
    for i in range(n):
        if int(t[i]) == ignore_index:
            continue
        rows += 1
        for j in range(k):
            y = 1.0 if int(t[i]) == j else 0.0
            w = 1.0 if j == c else (q[j] * y + r[j] * (1 - y))
            total = total + w * _bce(z[i, j], torch.tensor(y, dtype=z.dtype))
    return total / max(rows, 1)


def sigmoid_eql_stats(z, t, ratio, gamma=12.0, mu=0.8, alpha=4.0):
    """P_j, N_j increments: sum_n |p - y| w over positives / negatives, foreground columns."""
    n, k = z.shape
    c = k - 1
    r = 1 / (1 + torch.exp(-gamma * (ratio - mu)))
    q = 1 + alpha * (1 - r)
    pos, neg = torch.zeros(c, dtype=z.dtype), torch.zeros(c, dtype=z.dtype)
    p = torch.sigmoid(z)
    for i in range(n):
        for j in range(c):
            if int(t[i]) == j:
                pos[j] += abs(p[i, j] - 1) * q[j]
            else:
                neg[j] += abs(p[i, j]) * r[j]
    return pos, neg


def focal_family(z, t, gamma, weight, alpha, quality=None, normalizer=None, ignore_index=-100):
    """Sum over valid rows and classes of weight_j * FL(z, y; gamma_j) / normalizer.

    Focal: alpha_t (1 - p_t)^g (-log p_t). Quality focal: negatives BCE(z,0) p^g, the target
    entry of a positive BCE(z, q) |q - p|^g.
    """
    n, c = z.shape
    total = 0.0
    positives = 0
    for i in range(n):
        ti = int(t[i])
        if ti == ignore_index:
            continue
        positives += ti < c
        for j in range(c):
            x = z[i, j]
            p = torch.sigmoid(x)
            if ti == j:
                if quality is None:
                    a = alpha if alpha is not None else 1.0
                    term = a * (1 - p) ** gamma[j] * _bce(x, torch.ones((), dtype=z.dtype))
                else:
                    qi = quality[i]
                    term = _bce(x, qi) * torch.abs(qi - p) ** gamma[j]
            else:
                a = (1 - alpha) if (alpha is not None and quality is None) else 1.0
                term = a * p ** gamma[j] * _bce(x, torch.zeros((), dtype=z.dtype))
            total = total + weight[j] * term
    if normalizer is None:
        normalizer = max(positives, 1)
    return total / normalizer


def adjusted_ce(z, t, margin_fn, ignore_index=-100):
    """mean over valid rows of -log softmax(z~)_y, z~_nj = z_nj + margin_fn(n, j, y_n)."""
    n, c = z.shape
    total, rows = 0.0, 0
    for i in range(n):
        ti = int(t[i])
        if ti == ignore_index:
            continue
        rows += 1
        adj = torch.stack([z[i, j] + margin_fn(i, j, ti) for j in range(c)])
        total = total - (adj[ti] - torch.logsumexp(adj, 0))
    return total / max(rows, 1)


def softmax_eql_margin(indicator, tau=1.0, eps=1e-4):
    """The paper's margin tau * log(max(I_j, eps) / max(I_y, eps)) for j != y, 0 for j == y."""
    def margin(i, j, y):
        if j == y:
            return 0.0
        return tau * math.log(max(float(indicator[j]), eps) / max(float(indicator[y]), eps))
    return margin
