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
