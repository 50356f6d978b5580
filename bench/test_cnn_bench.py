"""LeNet-5 training on the real MNIST, one epoch, xpnet against PyTorch CPU eager in one run.

The write-up's network (seed 001: two 3x3 ReLU convolutions with 2x2 average pooling, dense
120-84-10; 60,074 parameters), batch 128, Adam lr 1e-3, float32, the same number of steps:

- ``xpnet``: ``Sequential.fit`` on the uint8 images as ``load_mnist`` returns them (scaled by
  1/255 once, inside the timing), kernels on;
- ``xpnet-xp``: the same with ``XPNET_KERNELS=xp``: the reference math only;
- ``torch``: the same network in PyTorch (NCHW), on float32 images scaled once outside the
  timing, its default threads.

Each round trains a fresh model for one epoch; the test accuracy after it is recorded in
``extra_info`` and checked, so a benchmark that stopped training cannot pass.
Quick mode (XPNET_BENCH_QUICK=1) trains on 4,096 images.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import QUICK
from test_training_bench import mnist, mnist_pixels

IMPLS = ["xpnet", "xpnet-xp", "torch"]
BATCH, LR, SEED = 128, 1e-3, 0
ROWS = 4096 if QUICK else None
MIN_ACCURACY = 0.3 if QUICK else 0.9  # after one epoch (chance is 0.1; 32 steps in quick mode)


def _xpnet_run(X, y, Xt, yt):
    from xpnet.recipes import lenet5

    model = lenet5(seed=SEED)
    train = lambda: model.fit(X, y, epochs=1, batch_size=BATCH, optimizer="adam", lr=LR, verbose=0)  # noqa: E731
    return train, lambda: model.score(Xt, yt)


def _torch_run(X, y, Xt, yt):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(SEED)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 3), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    images = torch.from_numpy(X.reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(y)

    def train():
        order = torch.randperm(images.shape[0])
        for lo in range(0, images.shape[0], BATCH):
            idx = order[lo : lo + BATCH]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(images[idx]), labels[idx]).backward()
            opt.step()

    def accuracy():
        with torch.no_grad():
            logits = net(torch.from_numpy(Xt.reshape(-1, 1, 28, 28)))
        return float((logits.argmax(1).numpy() == yt).mean())

    return train, accuracy


@pytest.mark.parametrize("impl", IMPLS)
def test_lenet5_epoch(benchmark, impl, monkeypatch):
    pixels, y, test_pixels, yt = mnist_pixels()
    floats, _, test_floats, _ = mnist()
    if ROWS:
        pixels, floats, y = pixels[:ROWS], floats[:ROWS], y[:ROWS]
    if impl == "xpnet-xp":
        monkeypatch.setenv("XPNET_KERNELS", "xp")
    else:
        monkeypatch.delenv("XPNET_KERNELS", raising=False)
    benchmark.group = "LeNet-5 epoch"
    benchmark.extra_info.update(config="LeNet-5", impl=impl, scope="epoch", rows=int(y.shape[0]),
                                steps=-(-y.shape[0] // BATCH))
    run = {}

    def setup():  # untimed: a fresh model and optimizer for every round
        if impl.startswith("xpnet"):
            run["train"], run["accuracy"] = _xpnet_run(pixels, y, test_pixels, yt)
        else:
            run["train"], run["accuracy"] = _torch_run(floats, y, test_floats, yt)
        return (), {}

    if impl == "xpnet":  # compile the kernels outside the timing
        from xpnet.recipes import lenet5

        lenet5(seed=SEED).fit(pixels[:256], y[:256], epochs=1, batch_size=BATCH, optimizer="adam", verbose=0)
    benchmark.pedantic(lambda: run["train"](), setup=setup, rounds=1 if QUICK else 3, iterations=1)
    accuracy = run["accuracy"]()
    benchmark.extra_info["test_accuracy"] = accuracy
    assert accuracy > MIN_ACCURACY, f"{impl} reached {accuracy:.3f} after one epoch"
