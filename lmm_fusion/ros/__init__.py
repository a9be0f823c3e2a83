"""ROS 2 plumbing: the lifecycle node (``node``), its parameters (``params``, ROS-free), its cycle thread
(``worker``), outputs as messages (``outputs``), diagnostics, DDS transport settings (``dds``) and the bag
player (``player``). Importing the package imports none of them."""
