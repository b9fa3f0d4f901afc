"""worldlm-secure: train language models as a federation of federations, with enforced privacy."""

__version__ = "0.1.0"
