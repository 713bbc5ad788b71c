"""Ray Data stages: callable classes (one actor pool each) and the input normalisation function."""

from qzoom_ray.pipeline.stages.cpu import CropPrep, PrepareImages, normalise_input
from qzoom_ray.pipeline.stages.gpu import CoarsePass, CoarseZoomPass, ZoomPass

__all__ = ["CoarsePass", "CoarseZoomPass", "CropPrep", "PrepareImages", "ZoomPass", "normalise_input"]
