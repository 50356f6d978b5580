"""Draw a digit in the browser and watch the network guess.

``preprocess`` turns a drawing into an MNIST-style 28x28 image; ``server`` serves the page and the
``POST /predict`` endpoint it calls (standard library only). Run it with ``xpnet draw``.
"""

from .preprocess import preprocess

__all__ = ["preprocess"]
