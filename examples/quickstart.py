"""Quick start: cross-entropy vs Softmax-EQL on a synthetic long-tailed problem (seconds, CPU).

Ten Gaussian classes in 16 dimensions, with 500 training samples for the head class down to 5
for the tail (imbalance 100), and a balanced test set. The same small MLP is trained with each
loss; the table shows test accuracy overall and by frequency group, and the gradient ratio
that Softmax-EQL accumulated for the head and the tail class.

    python examples/quickstart.py
"""

import torch

from eqlosses import CrossEntropyLoss, SoftmaxEQLLoss
from eqlosses.data import class_counts, many_medium_few_groups

C, DIM, N_MAX, IMBALANCE = 10, 16, 500, 100


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, DIM, generator=g) * 1.1
    train_n = [max(1, round(N_MAX * IMBALANCE ** (-k / (C - 1)))) for k in range(C)]

    def sample(counts):
        y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
        return centers[y] + torch.randn(len(y), DIM, generator=g), y

    return sample(train_n), sample([200] * C)


def train(criterion, x, y, steps=600, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.ReLU(), torch.nn.Linear(64, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=g)
        loss = criterion(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main():
    torch.set_num_threads(1)  # a tiny model: thread start-up costs more than it saves
    (x_tr, y_tr), (x_te, y_te) = make_data()
    counts = class_counts(y_tr, C)
    groups = many_medium_few_groups(counts, few_below=20, many_above=100)
    print(f"training counts per class: {counts.tolist()}")
    print(f"{'loss':<12} {'overall':>8} {'many':>6} {'medium':>7} {'few':>6}")
    for name, crit in [("CE", CrossEntropyLoss(C)), ("Softmax-EQL", SoftmaxEQLLoss(C))]:
        model = train(crit, x_tr, y_tr)
        with torch.no_grad():
            pred = model(x_te).argmax(1)
        per_class = torch.stack([(pred[y_te == k] == k).float().mean() for k in range(C)])
        row = [per_class.mean().item()] + [per_class[groups.masks[g]].mean().item()
                                           for g in ("many", "medium", "few")]
        print(f"{name:<12} " + " ".join(f"{100 * v:>6.1f}%" for v in row))
        if isinstance(crit, SoftmaxEQLLoss):
            ratio = crit.stats.ratio(init=1.0)
            print(f"gradient ratio P/N: head class {ratio[0]:.3f}, tail class {ratio[-1]:.3f}")


if __name__ == "__main__":
    main()
