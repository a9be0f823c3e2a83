"""The synthetic world: scenes, camera, LiDAR and GNSS models, drives and datasets."""
