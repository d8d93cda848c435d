"""Zero-shot prompt templates as data (CLIP's published template lists; `{}` is the class name)."""

SIMPLE_TEMPLATES = ["a photo of a {}."]

# A compact, varied set used by the template comparison (the main job) on any dataset.
COMPARISON_TEMPLATES = [
    "{}",
    "a photo of a {}.",
    "a drawing of a {}.",
    "itap of a {}.",
    "a rendering of a {}.",
    "a picture of a small {}.",
    "a bad photo of the {}.",
    "art of the {}.",
]
