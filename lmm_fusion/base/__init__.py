"""The shared vocabulary: labels, grids, the sensor rig and vehicle, topic names, shipped-file paths."""
