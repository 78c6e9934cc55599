"""tl: transfer learning for torchvision classifiers, the PyTorch tutorial's two scenarios."""

__version__ = "0.1.0"
