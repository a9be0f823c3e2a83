"""Class vocabularies shared by the model, the ground-truth expert and the output messages.

The integer values equal the constants of the ``lmm_fusion`` messages (``SceneAssessment.RISK_*``,
``LIGHT_*``, ``ActionSuggestion.ACTION_*``); a test keeps the two in step.
"""

from enum import IntEnum

#: Input modalities, in the order used by masks, statuses and attention shares everywhere.
MODALITIES: tuple[str, ...] = ("camera", "lidar", "gnss")


class Risk(IntEnum):
    LOW = 0
    MEDIUM = 1
    HIGH = 2


class Light(IntEnum):
    NONE = 0  # no light governs the ego lane ahead
    RED = 1
    YELLOW = 2
    GREEN = 3


class Action(IntEnum):
    KEEP_LANE = 0
    FOLLOW = 1
    SLOW_DOWN = 2
    STOP = 3
    CHANGE_LANE_LEFT = 4
    CHANGE_LANE_RIGHT = 5


class Scenario(IntEnum):
    """Scenario families of the synthetic world (also used for per-family evaluation)."""

    FREE_ROAD = 0
    LEAD_VEHICLE = 1  # slower or braking lead vehicle
    STOPPED_OBSTACLE_FREE_LEFT = 2  # stopped obstacle in ego lane, neighbouring lane free
    STOPPED_OBSTACLE_BLOCKED = 3  # stopped obstacle in ego lane, neighbouring lane blocked
    PEDESTRIAN_CROSSING = 4
    TRAFFIC_LIGHT = 5
    CUT_IN = 6
