"""AI-Sight core: image preprocessing, the model artifact and its card, and the predictor.

Shared by the web app (serving) and the `training` package, so both see identical inputs.
"""

__version__ = "0.1.0"
LABELS = ("healthy", "diseased")  # index 1 of the model's softmax is P(diseased)
