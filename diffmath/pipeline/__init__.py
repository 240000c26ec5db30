"""The pipeline: training, sampling and evaluating a denoiser with the verified core.

One module per responsibility (docs/design.md, "Layers"); nothing in the math layer imports
from here.
"""
