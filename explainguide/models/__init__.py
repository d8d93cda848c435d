"""CLIP loading: one front door, `load_clip`, returning a `ClipBundle`."""

from explainguide.models.loading import ClipBundle, ModelLoadError, load_clip

__all__ = ["ClipBundle", "ModelLoadError", "load_clip"]
