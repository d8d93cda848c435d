"""explainguide: explainability-aided CLIP (No Token Left Behind, ECCV 2022) as a Hydra experiment framework."""

__version__ = "0.1.0"
