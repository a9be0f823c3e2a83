"""ROS 2 plumbing: the lifecycle node, its parameters, outputs as messages, diagnostics, the bag player."""
