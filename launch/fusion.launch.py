"""Launch the lmm_fusion fusion node (ROS 2 Jazzy), optionally with RViz and bag playback.

    ros2 launch lmm_fusion fusion.launch.py
    ros2 launch lmm_fusion fusion.launch.py rviz:=true bag:=/path/to/drive use_sim_time:=true
    ros2 launch lmm_fusion fusion.launch.py namespace:=car1 params_file:=/path/to/my.yaml
    ros2 launch lmm_fusion fusion.launch.py lidar_points:=/velodyne_points gnss_fix:=/fix
    ros2 launch lmm_fusion fusion.launch.py namespace:=car1 camera_image:=sensors/camera/image_raw \
        camera_compressed:=sensors/camera/image_raw/compressed camera_info:=sensors/camera/camera_info \
        lidar_points:=sensors/lidar/points gnss_fix:=sensors/gnss/fix rviz:=true

The node is a managed (lifecycle) node; with ``autostart:=true`` (default) it configures and
activates itself, with ``autostart:=false`` it waits for lifecycle ChangeState requests.
The node subscribes to relative input names (``~/input/camera/image``, ``~/input/camera/compressed``,
``~/input/camera/camera_info``, ``~/input/lidar/points``, ``~/input/gnss/fix``, ``~/input/odometry``); the
``camera_image``, ``camera_compressed``, ``camera_info``, ``lidar_points``, ``gnss_fix`` and ``odometry``
(optional ego speed: nav_msgs/Odometry, or TwistWithCovarianceStamped with ``odometry_type: twist``) arguments
remap them, by default
to the absolute ``/sensors/...`` topics the recorders and bags use. A relative value (no leading ``/``)
resolves in ``namespace``, so one launch per vehicle (``namespace:=car1``) keeps the vehicles apart; the
outputs (``~/scene_assessment``, ...) are always under ``/<namespace>/fusion_node``. RViz starts in the same
namespace and its config names relative topics: ``fusion_node/...`` and ``sensors/...``.
``bag:=PATH`` plays a rosbag2 with ``lmm-fusion play --clock`` (use it with ``use_sim_time:=true``).
``dds_profile:=PATH`` is the Fast DDS profile for every process started here; the default
(config/fastdds_large_data.xml) gives shared memory large enough for whole full-size point clouds and
images, which Fast DDS's default UDP fragments lose under the sensor-data QoS. Sensor drivers on the
same computer should use the same profile (FASTRTPS_DEFAULT_PROFILES_FILE); ``dds_profile:=''`` keeps
the environment's.
"""

# `launch` is the ROS 2 package, not this repository's launch/ folder (which isort sees as first-party).
from launch import LaunchDescription  # noqa: I001
from launch.actions import DeclareLaunchArgument, ExecuteProcess, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import FindExecutable, LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "lmm_fusion"
#: Launch argument, the node's relative input name (lmm_fusion.ros.params.INPUTS), default topic.
INPUTS = (
    ("camera_image", "~/input/camera/image", "/sensors/camera/image_raw"),
    ("camera_compressed", "~/input/camera/compressed", "/sensors/camera/image_raw/compressed"),
    ("camera_info", "~/input/camera/camera_info", "/sensors/camera/camera_info"),
    ("lidar_points", "~/input/lidar/points", "/sensors/lidar/points"),
    ("gnss_fix", "~/input/gnss/fix", "/sensors/gnss/fix"),
    ("odometry", "~/input/odometry", "/sensors/odometry"),
)


def generate_launch_description() -> LaunchDescription:
    params_file = LaunchConfiguration("params_file")
    use_sim_time = LaunchConfiguration("use_sim_time")
    namespace = LaunchConfiguration("namespace")
    autostart = LaunchConfiguration("autostart")
    rviz = LaunchConfiguration("rviz")
    bag = LaunchConfiguration("bag")
    bag_rate = LaunchConfiguration("bag_rate")
    dds_profile = LaunchConfiguration("dds_profile")
    inputs = {name: LaunchConfiguration(name) for name, _, _ in INPUTS}

    arguments = [
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution(
            [FindPackageShare(PACKAGE), "config", "fusion.yaml"]), description="node parameters YAML"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="follow /clock"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate the lifecycle node at start-up"),
        DeclareLaunchArgument("rviz", default_value="false", description="start RViz with config/lmm_fusion.rviz"),
        DeclareLaunchArgument("bag", default_value="", description="rosbag2 folder to play (empty: none)"),
        DeclareLaunchArgument("bag_rate", default_value="1.0", description="bag playback speed factor"),
        DeclareLaunchArgument("dds_profile", default_value=PathJoinSubstitution(
            [FindPackageShare(PACKAGE), "config", "fastdds_large_data.xml"]),
            description="Fast DDS profile XML for the processes started here ('' = keep the environment's)"),
        *(DeclareLaunchArgument(name, default_value=default, description=f"topic remapped to {source}")
          for name, source, default in INPUTS),
    ]
    has_profile = IfCondition(PythonExpression(["'", dds_profile, "' != ''"]))
    dds_env = [
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE", dds_profile, condition=has_profile),  # Fast DDS 2.x
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", dds_profile, condition=has_profile),  # Fast DDS 3.x
    ]

    fusion_node = LifecycleNode(
        package=PACKAGE,
        executable="fusion_node",
        name="fusion_node",
        namespace=namespace,
        output="screen",
        emulate_tty=True,
        parameters=[params_file, {"use_sim_time": use_sim_time, "autostart": autostart}],
        remappings=[(source, inputs[name]) for name, source, _ in INPUTS],
    )

    rviz_node = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        namespace=namespace,  # the config's relative topics resolve in the vehicle's namespace
        arguments=["-d", PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "lmm_fusion.rviz"])],
        parameters=[{"use_sim_time": use_sim_time}],
        condition=IfCondition(rviz),
    )

    # `lmm-fusion` is installed under lib/lmm_fusion (not on PATH): run the CLI module instead.
    player = ExecuteProcess(
        cmd=[FindExecutable(name="python3"), "-m", "lmm_fusion.cli", "play", bag, "--clock", "--rate", bag_rate,
             "--wait-for-subscriber", "30"],
        output="screen",
        condition=IfCondition(PythonExpression(["'", bag, "' != ''"])),
    )

    return LaunchDescription([*arguments, *dds_env, fusion_node, rviz_node, player])
