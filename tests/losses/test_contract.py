"""The loss-model contract: declared traits, the registry, and building a loss for a head."""

import pytest
import torch
from torch import nn

from eqlosses.losses import (HEADS, LOSSES, BCELoss, ClassStatistics, LongTailLoss,
                             LossTraits, Param, SigmoidEQLLoss, build_loss, build_loss_for,
                             check_fits, check_loss_args, check_loss_config, head_for,
                             loss_class, losses_for, register_loss)
from eqlosses.losses.contract import EXTRA_CHANNELS, REDUCTION

C = 4
STATS = ClassStatistics(torch.tensor([600.0, 250.0, 100.0, 5.0]), total=10000)  # EQL: 1 rare


def _pairs():
    return [(name, head) for name, cls in sorted(LOSSES.items()) for head in cls.traits.heads]


def _inputs(loss, head, g):
    """Logits, targets and keyword arguments as the host of ``head`` feeds them."""
    n = 12
    if head == "seg" and loss.traits.pixels == "native":
        logits = torch.randn(2, loss.num_channels, 3, 3, generator=g, dtype=torch.float64)
        targets = torch.randint(0, C, (2, 3, 3), generator=g)
        return logits, targets, {}
    high = C if head in ("roi", "dense") else C - 1  # background rows only where they exist
    logits = torch.randn(n, loss.num_channels, generator=g, dtype=torch.float64)
    targets = torch.randint(0, high + 1, (n,), generator=g)
    targets[0], targets[-1] = 0, high
    kwargs = {}
    if head == "dense" and loss.traits.normalizer:
        kwargs["normalizer"] = 3.0
    if loss.traits.quality:
        kwargs["quality"] = torch.rand(n, generator=g, dtype=torch.float64)
    return logits, targets, kwargs


@pytest.mark.parametrize("name,head", _pairs())
def test_each_declared_head_builds_fits_and_trains(name, head):
    g = torch.Generator().manual_seed(0)
    loss = build_loss_for(head, name, C, STATS, generator=torch.Generator().manual_seed(1))
    traits = check_fits(loss, head, C)
    convention = traits.background_of(loss.num_channels - C)
    assert convention in HEADS[head].backgrounds
    assert loss.num_channels == C + EXTRA_CHANNELS[convention]
    logits, targets, kwargs = _inputs(loss, head, g)
    logits.requires_grad_(True)
    value = loss(logits, targets, **kwargs)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    scores = loss.scores(logits.detach())
    assert scores.shape[1] == C and torch.all((scores >= 0) & (scores <= 1))
    if traits.gradient_statistics or traits.track_statistics:  # the baselines track them
        assert int(loss.stats.num_updates) == 1
        assert float(loss.stats.pos_grad.sum() + loss.stats.neg_grad.sum()) > 0
    else:
        assert not hasattr(loss, "stats")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_declared_normalizer_and_quality_match_the_forward(name):
    """A loss that declares a normaliser divides by it; one that declares quality needs it."""
    head = "dense" if "dense" in LOSSES[name].traits.heads else LOSSES[name].traits.heads[0]
    loss = build_loss_for(head, name, C, STATS).eval()
    logits, targets, kwargs = _inputs(loss, head, torch.Generator().manual_seed(3))
    if loss.traits.normalizer:
        one = loss(logits, targets, **{**kwargs, "normalizer": 1.0})
        four = loss(logits, targets, **{**kwargs, "normalizer": 4.0})
        torch.testing.assert_close(one / 4, four)
    else:
        with pytest.raises(TypeError):
            loss(logits, targets, normalizer=1.0)
    if loss.traits.quality:
        with pytest.raises(TypeError):
            loss(logits, targets)


@pytest.mark.parametrize("name", losses_for("seg"))
def test_declared_pixel_layout_matches_the_forward(name):
    """``pixels="native"`` losses take ``[B, C, H, W]`` and equal their rows form; ``"rows"``
    losses refuse 4-D logits (the host flattens the pixels for them)."""
    loss = build_loss_for("seg", name, C, STATS, ignore_index=255).eval()
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, C, 3, 4, generator=g, dtype=torch.float64)
    targets = torch.randint(0, C, (2, 3, 4), generator=g)
    targets[0, 0, :2] = 255
    rows = logits.permute(0, 2, 3, 1).reshape(-1, C), targets.reshape(-1)
    if loss.traits.pixels == "native":
        torch.testing.assert_close(loss(logits, targets), loss(*rows))
    else:
        with pytest.raises(ValueError, match=r"logits must have shape \[N, C\]"):
            loss(logits, targets)
        assert torch.isfinite(loss(*rows))


def test_heads_refuse_reductions_they_cannot_host():
    with pytest.raises(ValueError, match="needs reduction='mean'"):
        check_loss_config("cls", "ce", {"reduction": "none"})
    with pytest.raises(ValueError, match="needs reduction='mean'.*divides by it"):
        check_loss_config("det", "focal", {"reduction": "sum"}, arch="retinanet")
    with pytest.raises(ValueError, match="must be built with reduction='mean'"):
        check_fits(build_loss("sigmoid_eql", C, reduction="sum"), "roi")


def test_a_softmax_loss_does_not_fit_a_sigmoid_head():
    traits = LossTraits("softmax", {"index": {}}, ("dense",))  # declares a head it cannot fit

    class SoftDense(SquaredHingeLoss):
        pass

    SoftDense.traits = traits
    with pytest.raises(ValueError, match="it is a softmax loss; this head scores with sigmoid"):
        check_loss_args("dense", SoftDense, {})


def test_background_of_picks_the_convention_the_head_feeds():
    traits = LossTraits("sigmoid", {"none": {}, "index": {}}, ("cls", "dense"))
    assert traits.background_of(0) == "none" and traits.background_of(0, "dense") == "index"
    assert traits.background_of(1) is None


def test_check_fits_says_how_to_build_the_loss_for_the_head():
    with pytest.raises(ValueError, match="build it with background=False"):
        check_fits(build_loss("ce", C, background=True), "cls")
    with pytest.raises(ValueError, match="build it with objectness=False"):
        check_fits(BCELoss(C, objectness=True, reduction="sum"), "dense")
    check_fits(BCELoss(C, objectness=False), "roi")  # index: background rows, C channels


def test_losses_for_each_head():
    # written from the design: softmax losses without a background have no R-CNN or dense
    # place, Seesaw needs its two objectness columns (R-CNN only), EQFL needs IoU targets
    assert losses_for("roi") == ["bce", "ce", "eql", "eql_softmax", "federated", "seesaw",
                                 "sigmoid_eql"]
    assert losses_for("dense") == ["bce", "efl", "eqfl", "eql", "federated", "focal"]
    assert losses_for("seg") == ["balanced_softmax", "ce", "focal", "softmax_eql",
                                 "softmax_eql_x"]
    assert "seesaw" not in losses_for("cls") and "eqfl" not in losses_for("cls")
    assert {"softmax_eql", "balanced_softmax", "sigmoid_eql", "efl"} <= set(losses_for("cls"))
    assert losses_for("det") == sorted(set(losses_for("roi")) | set(losses_for("dense")))
    with pytest.raises(ValueError, match="unknown head 'rpn'"):
        losses_for("rpn")


def test_conventions_chosen_for_the_head():
    assert build_loss_for("roi", "ce", C).num_channels == C + 1  # background class column
    assert build_loss_for("cls", "ce", C).num_channels == C
    assert build_loss_for("roi", "sigmoid_eql", C).objectness is True
    assert build_loss_for("cls", "sigmoid_eql", C).objectness is False
    assert build_loss_for("roi", "seesaw", C).num_channels == C + 2
    # an explicit switch wins when the head can feed it ...
    assert build_loss_for("roi", "sigmoid_eql", C, objectness=False).num_channels == C
    # ... and is refused when it cannot
    with pytest.raises(ValueError, match="background=True its background convention"):
        build_loss_for("cls", "ce", C, background=True)
    with pytest.raises(ValueError, match="background=False.*losses that fit"):
        build_loss_for("roi", "ce", C, background=False)


def test_dense_head_sums_losses_without_a_normaliser():
    assert build_loss_for("dense", "bce", C).reduction == "sum"
    assert build_loss_for("dense", "focal", C).reduction == "mean"  # takes the normaliser
    with pytest.raises(ValueError, match="reduction='sum'"):
        build_loss_for("dense", "bce", C, reduction="mean")
    with pytest.raises(ValueError, match="reduction='sum'"):
        check_fits(BCELoss(C), "dense")
    check_fits(BCELoss(C, reduction="sum"), "dense")


def test_training_statistics_fill_the_declared_arguments():
    counts = STATS.counts
    eql = build_loss_for("cls", "eql", C, STATS, lambda_=0.02)
    torch.testing.assert_close(eql.class_frequency, (counts / 10000).float())
    bal = build_loss_for("cls", "balanced_softmax", C, STATS)
    torch.testing.assert_close(bal.adjustment.exp(), (counts / counts.sum()).float())
    fed = build_loss_for("roi", "federated", C, STATS, power=1.0)
    torch.testing.assert_close(fed.sampling_weight, counts.float())
    given = build_loss_for("cls", "balanced_softmax", C, STATS, class_counts=[1, 1, 1, 1])
    torch.testing.assert_close(given.adjustment, torch.full((C,), -torch.log(torch.tensor(4.0))))
    with pytest.raises(ValueError, match="needs the training counts.*statistics="):
        build_loss_for("cls", "balanced_softmax", C)
    with pytest.raises(ValueError, match="statistics have 4 classes.*num_classes=3"):
        build_loss_for("cls", "balanced_softmax", 3, STATS)


def test_stochastic_losses_get_the_generator_and_segmentation_the_ignore_label():
    g = torch.Generator()
    assert build_loss_for("roi", "federated", C, STATS, generator=g).generator is g
    assert build_loss_for("seg", "softmax_eql", C, ignore_index=255).ignore_index == 255
    assert not hasattr(build_loss_for("cls", "softmax_eql", C, generator=g), "generator")


@pytest.mark.parametrize("kwargs,match", [
    ({"tau": "abc"}, "tau must be a number >= 0, got 'abc'"),
    ({"tau": -1}, "tau must be a number >= 0, got -1"),
    ({"tau": True}, "tau must be a number"),
    ({"eps": 0}, "eps must be a number > 0"),
    ({"indicator": "both"}, "indicator must be one of 'pos', 'neg'"),
    ({"reduction": "avg"}, "reduction must be one of 'mean', 'sum', 'none'"),
    ({"ignore_index": 1.5}, "ignore_index must be an integer"),
    ({"tau": float("inf")}, "tau must be a number >= 0, got inf"),
    ({"taus": 1.0}, "takes no argument 'taus'; its arguments: eps, ignore_index, indicator, "
                    "reduction, stats, tau"),
])
def test_arguments_are_checked_before_any_data(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_loss_args("cls", "softmax_eql", kwargs)
    with pytest.raises(ValueError, match=match):
        build_loss("softmax_eql", C, **kwargs)


def test_constructors_check_their_hyper_parameters_too():
    with pytest.raises(ValueError, match="SigmoidEQLLoss: alpha must be a number >= 0"):
        SigmoidEQLLoss(C, alpha=-1.0)
    with pytest.raises(ValueError, match="lambda_ must be a number > 0 and <= 1"):
        build_loss("eql", C, class_frequency=torch.ones(C), lambda_=0.0)
    with pytest.raises(ValueError, match="num_sampled must be an integer >= 1, got 2.5"):
        build_loss("federated", C, class_image_counts=torch.ones(C), num_sampled=2.5)
    with pytest.raises(ValueError, match="alpha must be a number >= 0 and <= 1 or null"):
        build_loss("focal", C, alpha=2.0)
    assert build_loss("focal", C, alpha=None).alpha is None


def test_config_check_names_the_task_head_and_refuses_objects():
    check_loss_config("det", "sigmoid_eql", {"gamma": 10}, arch="mask_rcnn")
    with pytest.raises(ValueError, match="does not fit the dense head.*losses that fit: bce, "
                                         "efl, eqfl, eql, federated, focal"):
        check_loss_config("det", "sigmoid_eql", {}, arch="fcos")
    with pytest.raises(ValueError, match="cannot be given in a configuration"):
        check_loss_config("cls", "softmax_eql", {"stats": None})
    with pytest.raises(ValueError, match="unknown det architecture 'yolo'"):
        check_loss_config("det", "focal", {}, arch="yolo")
    assert head_for("det", "faster_rcnn") == "roi" and head_for("seg") == "seg"


def test_repr_shows_the_hyper_parameters():
    text = repr(build_loss("sigmoid_eql", C, gamma=10))
    assert "gamma=10.0, mu=0.8, alpha=4.0, init_ratio=100.0, objectness=True" in text
    assert "lambda_=0.5" in repr(build_loss("eql", C, class_frequency=torch.ones(C) * 0.1,
                                            lambda_=0.5))


def test_every_registered_loss_declares_traits_consistent_with_its_class():
    for name, cls in LOSSES.items():
        traits = cls.traits
        assert isinstance(traits, LossTraits), name
        for key in traits.params:
            assert hasattr(cls(C, **_statistics_kwargs(cls)), key), (name, key)
        assert traits.gradient_statistics == ("stats" in cls(C, **_statistics_kwargs(cls))
                                              ._modules), name


def _statistics_kwargs(cls):
    return {arg: STATS.value(stat) for arg, stat in cls.traits.statistics.items()}


# ---------------------------------------------------------------------------------------------
# A loss of the user's own
# ---------------------------------------------------------------------------------------------

class SquaredHingeLoss(LongTailLoss):
    """A user's sigmoid loss: declares its traits, so the pipelines can host it."""

    traits = LossTraits(activation="sigmoid", backgrounds={"index": {}}, heads=("cls", "dense"),
                        params={"margin": Param(float, low=0), "reduction": REDUCTION})

    def __init__(self, num_classes, margin=1.0, ignore_index=-100, reduction="mean"):
        super().__init__(num_classes, ignore_index, reduction)
        self._set_hparams(margin=margin)
        self.num_channels = num_classes

    def forward(self, logits, targets):
        keep = targets != self.ignore_index
        y = torch.nn.functional.one_hot(targets[keep], self.num_classes + 1)[:, :-1]
        per_row = (self.margin - (2 * y - 1) * logits[keep]).clamp(min=0).pow(2).sum(1)
        return per_row.sum() if self.reduction == "sum" else per_row.mean()

    def scores(self, logits):
        return torch.sigmoid(logits)


def test_a_user_loss_is_built_checked_and_registered():
    loss = build_loss_for("cls", "tests.losses.test_contract:SquaredHingeLoss", C, margin=0.5)
    assert isinstance(loss, SquaredHingeLoss) and loss.margin == 0.5
    assert build_loss_for("dense", SquaredHingeLoss, C).reduction == "sum"
    with pytest.raises(ValueError, match="margin must be a number >= 0"):
        check_loss_config("cls", "tests.losses.test_contract:SquaredHingeLoss", {"margin": -1})
    with pytest.raises(ValueError, match="declares the heads cls, dense only"):
        check_loss_config("det", "tests.losses.test_contract:SquaredHingeLoss", {},
                          arch="faster_rcnn")
    register_loss("squared_hinge")(SquaredHingeLoss)
    try:
        assert "squared_hinge" in losses_for("cls") and "squared_hinge" in losses_for("dense")
        assert loss_class("squared_hinge") is SquaredHingeLoss
        with pytest.raises(ValueError, match="already taken"):
            register_loss("squared_hinge")(BCELoss)
    finally:
        del LOSSES["squared_hinge"]


def test_a_class_without_traits_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="declares no `traits`"):
        register_loss("plain")(nn.BCEWithLogitsLoss)
    with pytest.raises(ValueError, match="cannot import loss 'no_such_module:X'"):
        loss_class("no_such_module:X")
    with pytest.raises(ValueError, match="unknown loss 'eqlv3'; choose one of"):
        loss_class("eqlv3")


def test_traits_declarations_are_checked():
    with pytest.raises(ValueError, match="head 'roi' accepts"):
        LossTraits("softmax", {"none": {}}, ("roi",))
    with pytest.raises(ValueError, match="activation must be"):
        LossTraits("tanh", {"none": {}}, ("cls",))
    with pytest.raises(ValueError, match="statistics must map"):
        LossTraits("softmax", {"none": {}}, ("cls",), statistics={"class_counts": "prior"})


def test_class_statistics():
    s = ClassStatistics.from_labels([0, 0, 0, 2], num_classes=3)
    assert s.counts.tolist() == [3.0, 0.0, 1.0] and s.total == 4
    torch.testing.assert_close(s.value("frequency"),
                               torch.tensor([0.75, 0.0, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative"):
        ClassStatistics(torch.tensor([-1.0]), total=1)
    with pytest.raises(ValueError, match="total must be > 0"):
        ClassStatistics(torch.tensor([1.0]), total=0)
