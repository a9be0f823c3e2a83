"""Default topic names and frame ids (REP-105). The node, the synthetic world, replay and the CARLA
bridge all use these, so a bag recorded by one is read by the others without remapping."""

CAMERA_IMAGE = "/sensors/camera/image_raw"
CAMERA_COMPRESSED = "/sensors/camera/image_raw/compressed"
CAMERA_INFO = "/sensors/camera/camera_info"
LIDAR_POINTS = "/sensors/lidar/points"
GNSS_FIX = "/sensors/gnss/fix"
#: nav_msgs/Odometry or geometry_msgs/TwistWithCovarianceStamped: the vehicle's own speed (optional input).
ODOMETRY = "/sensors/odometry"
TF_STATIC = "/tf_static"
CLOCK = "/clock"

GT_SCENE = "/ground_truth/scene_assessment"
GT_ACTION = "/ground_truth/action_suggestion"
GT_OCCUPANCY = "/ground_truth/occupancy"
#: std_msgs/String: scenario family name (a :class:`lmm_fusion.base.vocabulary.Scenario` member name).
GT_SCENARIO = "/ground_truth/scenario"
#: nav_msgs/Odometry: true ego pose in ``map`` and velocity in ``base_link``.
GT_EGO = "/ground_truth/ego_odometry"

BASE_FRAME = "base_link"
MAP_FRAME = "map"
CAMERA_FRAME = "camera_optical"
LIDAR_FRAME = "lidar"
GNSS_FRAME = "gnss"

#: Name of the fusion node: its ``~/...`` outputs are published under ``/<NODE_NAME>/``.
NODE_NAME = "fusion_node"
