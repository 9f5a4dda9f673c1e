"""Step-by-step agreement with numbers produced by the authors' own code (tests/golden/).

Each golden file is one fresh loss instance run for 5 training steps; the weights at step s come
from the statistics after step s-1. We compare loss values, gradients w.r.t. the logits, the
weights/ratios in force and the accumulated statistics after every step, in float64.
"""

import numpy as np
import pytest
import torch

from eqlosses import (EQLLoss, EqualizedFocalLoss, EqualizedQualityFocalLoss, SeesawLoss,
                      SigmoidEQLLoss, SoftmaxEQLLoss)

RTOL = 1e-6


def close(actual, expected, rtol=RTOL, atol=1e-12):
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else actual
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def run_steps(crit, g, call):
    """Yield (step, loss, grad) for the 5 golden steps."""
    for s in range(g["loss"].shape[0]):
        logits = torch.tensor(g["logits"][s], dtype=torch.float64, requires_grad=True)
        loss = call(crit, logits, s)
        loss.backward()
        yield s, loss, logits.grad


def test_sigmoid_eql_matches_reference(golden):
    g = golden("eqlv2")
    c = int(g["hp_num_classes"])
    crit = SigmoidEQLLoss(c, gamma=float(g["hp_gamma"]), mu=float(g["hp_mu"]),
                          alpha=float(g["hp_alpha"]), init_ratio=float(g["init_pos_neg"]))
    for s in range(5):
        terms = crit.class_terms()
        close(terms["ratio"], g["pos_neg_before"][s])
        close(terms["pos_weight"], g["pos_w"][s][:c])
        close(terms["neg_weight"], g["neg_w"][s][:c])
        logits = torch.tensor(g["logits"][s], requires_grad=True)
        loss = crit(logits, torch.tensor(g["labels"][s]))
        loss.backward()
        close(loss, g["loss"][s])
        close(logits.grad, g["grad"][s])
        close(crit.stats.pos_grad, g["pos_grad"][s])
        close(crit.stats.neg_grad, g["neg_grad"][s])
        close(crit.stats.ratio(100.0), g["pos_neg"][s])


def _efl_targets(labels, c):
    """Reference labels (0 = background, k + 1 = class k, -1 = ignore) -> ours."""
    labels = torch.as_tensor(labels)
    out = labels - 1
    out[labels == 0] = c
    out[labels == -1] = -100
    return out


@pytest.mark.parametrize("name", ["efl", "eqfl"])
def test_equalized_focal_losses_match_reference(golden, name):
    g = golden(name)
    c = int(g["hp_num_classes_incl_bg"]) - 1
    if name == "efl":
        crit = EqualizedFocalLoss(c, focal_gamma=float(g["hp_focal_gamma"]),
                                  scale_factor=float(g["hp_scale_factor"]),
                                  alpha=float(g["hp_focal_alpha"]))
    else:
        crit = EqualizedQualityFocalLoss(c, focal_gamma=float(g["hp_focal_gamma"]),
                                         scale_factor=float(g["hp_scale_factor"]))
    for s in range(5):
        terms = crit.class_terms()
        close(terms["ratio"], g["pos_neg_before"][s])
        close(terms["gamma"], g["gamma_used"][s])
        close(terms["weight_factor"], g["weight_factor_used"][s])
        logits = torch.tensor(g["logits"][s], requires_grad=True)
        targets = _efl_targets(g["labels"][s], c)
        norm = torch.tensor(g["normalizer"][s])
        if name == "efl":
            loss = crit(logits, targets, normalizer=norm)
        else:
            loss = crit(logits, targets, quality=torch.tensor(g["scores"][s]), normalizer=norm)
        loss.backward()
        close(loss, g["loss"][s])
        close(logits.grad, g["grad"][s])
        close(crit.stats.pos_grad, g["pos_grad"][s])
        close(crit.stats.neg_grad, g["neg_grad"][s])
        close(crit.class_terms()["ratio"], g["pos_neg"][s])


def test_efl_on_conv_layout_outputs_matches_reference(golden):
    """The reference's input as a dense head produces it, per-level NCHW conv outputs, turned
    into rows (image-major, then level, then position) as a host does: loss, the gradient that
    reaches each conv output, and the statistics equal the reference's at every step (its hooks
    read the conv layout; the loss here reads only the rows it is given)."""
    g = golden("efl")
    c = int(g["hp_num_classes_incl_bg"]) - 1
    levels, images = int(g["hp_fpn_levels"]), int(g["hp_batch_images"])
    crit = EqualizedFocalLoss(c, focal_gamma=float(g["hp_focal_gamma"]),
                              scale_factor=float(g["hp_scale_factor"]),
                              alpha=float(g["hp_focal_alpha"]))
    for s in range(5):
        convs = [torch.tensor(g[f"logits_lvl{lvl}"][s], requires_grad=True)
                 for lvl in range(levels)]  # [B, C, H, W] each
        rows = torch.cat([conv[b].permute(1, 2, 0).reshape(-1, c)
                          for b in range(images) for conv in convs])
        loss = crit(rows, _efl_targets(g["labels"][s], c),
                    normalizer=torch.tensor(g["normalizer"][s]))
        loss.backward()
        close(loss, g["loss"][s])
        start = 0
        for b in range(images):  # the reference's row gradient, back in each conv's layout
            for conv in convs:
                h, w = conv.shape[2:]
                block = torch.tensor(g["grad"][s][start:start + h * w])
                close(conv.grad[b], block.reshape(h, w, c).permute(2, 0, 1))
                start += h * w
        assert start == g["grad"].shape[1]
        close(crit.stats.pos_grad, g["pos_grad"][s])
        close(crit.stats.neg_grad, g["neg_grad"][s])
        close(crit.class_terms()["ratio"], g["pos_neg"][s])


def test_softmax_eql_matches_reference(golden):
    _check_softmax_eql(golden("softmax-eql"))


@pytest.mark.slow
def test_softmax_eql_with_the_fused_cpu_kernel_matches_reference(golden, fused_kernel,
                                                                monkeypatch):
    """The same replay with the optional fused CPU kernel serving every step."""
    served = []
    real = fused_kernel.kernel_for
    monkeypatch.setattr(fused_kernel, "kernel_for",
                        lambda *a: served.append(real(*a) is not None) or real(*a))
    _check_softmax_eql(golden("softmax-eql"))
    assert len(served) == 5 and all(served)


def _check_softmax_eql(g):
    assert int(g["hp_indicator_code"]) == 0  # indicator "pos"
    c = int(g["hp_num_classes"])
    crit = SoftmaxEQLLoss(c, tau=float(g["hp_tau"]), eps=float(g["hp_eps"]), indicator="pos")
    for s in range(5):
        close(crit.stats.pos_grad, g["pos_grad_before"][s])
        close(crit.stats.neg_grad, g["neg_grad_before"][s])
        labels = torch.tensor(g["labels"][s])
        # The paper's margin a_j - a_y equals the reference's captured logit adjustment.
        margin = crit.class_terms()["margin"]
        adjustment = margin[None, :] - margin[labels][:, None]
        close(adjustment, g["logit_adjustment"][s], atol=1e-9)
        logits = torch.tensor(g["logits"][s], requires_grad=True)
        loss = crit(logits, labels)
        loss.backward()
        close(loss, g["loss"][s])
        close(logits.grad, g["grad"][s])
        close(crit.stats.pos_grad, g["pos_grad"][s])
        close(crit.stats.neg_grad, g["neg_grad"][s])
        close(crit.stats.ratio(1.0), g["pos_neg"][s])


def test_eql_matches_reference(golden):
    g = golden("eql")
    c = int(g["hp_num_classes"])
    freq = torch.tensor(g["freq_info_float32"])  # the reference compares in float32
    crit = EQLLoss(c, class_frequency=freq, lambda_=float(g["hp_lambda"]))
    assert ((crit.class_frequency < crit.lambda_).long() == torch.tensor(g["tail_mask"])).all()
    for s in range(5):
        logits = torch.tensor(g["logits"][s], requires_grad=True)
        loss = crit(logits, torch.tensor(g["labels"][s]))
        loss.backward()
        close(loss, g["loss"][s])
        close(logits.grad, g["grad"][s])


def test_seesaw_matches_reference(golden):
    g = golden("seesaw")
    c = int(g["hp_num_classes"])
    crit = SeesawLoss(c, p=float(g["hp_p"]), q=float(g["hp_q"]), eps=float(g["hp_eps"]))
    for s in range(5):
        logits = torch.tensor(g["logits"][s], requires_grad=True)
        loss = crit(logits, torch.tensor(g["labels"][s]), normalizer=float(g["avg_factor"]))
        loss.backward()
        close(crit.cum_samples, g["cum_samples"][s])
        # The reference divides by avg_factor + float32 eps (1.2e-7 on 64): ~2e-9 relative.
        close(loss, g["loss"][s])
        close(logits.grad, g["grad"][s])


def test_seesaw_factors_match_reference(golden):
    from eqlosses.functional import seesaw_weights

    g = golden("seesaw")
    c = int(g["hp_num_classes"])
    for s in range(5):
        labels = torch.tensor(g["labels"][s])
        fg = labels < c
        z = torch.tensor(g["logits"][s])[fg, :c]
        counts = torch.tensor(g["cum_samples"][s][:c])
        w = seesaw_weights(z, labels[fg], counts, float(g["hp_p"]), float(g["hp_q"]),
                           float(g["hp_eps"]))
        expected = g["seesaw_weights"][s][fg.numpy()]
        assert not np.isnan(expected).any()
        close(w, expected)
