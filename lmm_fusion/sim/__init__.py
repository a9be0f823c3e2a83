"""Synthetic driving world (scenes, sensors, rule-based ground truth -> rosbag2) and the CARLA bridge.

Entry points: :func:`lmm_fusion.sim.synth.synthesize` (one drive), :mod:`lmm_fusion.sim.synth_dataset`
(many drives), :mod:`lmm_fusion.sim.contact_sheet` (a PNG to look at). See ``docs/synthetic_world.md``.
"""
