"""lmm_fusion: real-time camera + LiDAR + GNSS fusion for scene assessment and action suggestion.

The core (io, sync, preprocess, model, runtime, pipeline, safety) is ROS-free; ROS 2 plumbing lives
in :mod:`lmm_fusion.node` and the message builders.
"""

__version__ = "0.1.0"
