"""The GPU peers of ``peers.py`` kept runnable without a GPU: each peer's training code
(PyTorch's epoch, JAX's scanned epoch where JAX is installed) on 2,048 images for 2 epochs on
the CPU. No timing: the GPU numbers come from ``python3 bench/peers.py`` on a GPU.
"""

from __future__ import annotations

import importlib.util

import pytest

import peers

PEERS = ["torch-graph"] + (["jax-scan"] if importlib.util.find_spec("jax") else [])


@pytest.fixture(scope="module")
def host():
    try:
        return peers.load_host(2048)
    except Exception as exc:  # no MNIST here (XPNET_DATA unset and no download)
        pytest.skip(f"MNIST unavailable: {exc}")


@pytest.mark.parametrize("peer", PEERS)
def test_each_peer_learns_the_same_recipe_from_xpnets_weights(peer, host):
    pytest.importorskip("torch" if peer.startswith("torch") else "jax")
    recipe = {**peers.RECIPES["784-50-25-10 SGD lr 0.1, 10 epochs"], "epochs": 2}
    trainer = (peers.TorchGraphEpoch(recipe, host, device="cpu") if peer == "torch-graph"
               else peers.JaxScanEpoch(recipe, host))
    runs = [peers.train(trainer, recipe, seed) for seed in (0, 0, 1)]
    # 2 epochs of 16 steps: far above chance (10%), and the reset makes a seed repeatable
    assert all(run["test_accuracy"] > 0.5 for run in runs), runs
    assert runs[0]["test_accuracy"] == pytest.approx(runs[1]["test_accuracy"], abs=1e-3)
    assert runs[0]["epochs"] == 2 and len(runs[0]["test_accuracy_per_epoch"]) == 1


def test_the_lenet_peers_start_from_xpnets_weights_and_learn(host):
    """``cuda_lenet.py``'s code on the CPU: PyTorch's LeNet-5 given xpnet's initial weights
    computes xpnet's outputs (the kernel and flatten reorderings), and the smoke run trains."""
    torch = pytest.importorskip("torch")
    import numpy as np

    import cuda_lenet
    from xpnet.recipes import lenet5

    X = host[0][:64].reshape(-1, 28, 28, 1)
    net = cuda_lenet.torch_lenet(torch, 3, "cpu")
    with torch.no_grad():
        theirs = torch.softmax(net(torch.as_tensor(X.transpose(0, 3, 1, 2).copy())), 1).numpy()
    np.testing.assert_allclose(theirs, lenet5(seed=3).predict_proba(X), atol=2e-6)
    report = cuda_lenet.main(["--smoke", "--epochs", "1", "--seeds", "0"])
    for name in ("xpnet", "torch-eager"):
        assert report["results"][name]["test_accuracy_mean"] > 0.3, report["results"][name]
    profiled = cuda_lenet.main(["--smoke", "--profile"])["profile"]
    assert "conv2d" in profiled["host_tottime"] and "kernels" not in profiled  # (no GPU: the host only)
