"""The ego's route through a CARLA map: one plan that ground truth, pure pursuit and the Traffic Manager follow.

Where a lane branches (a junction, or a lane splitting in two) ``waypoint.next(d)`` returns one
waypoint per successor, in an order the API does not define. Taking the first one, while the
Traffic Manager picks its own branch, labels and steers along a road the car does not take.
:class:`Route` therefore makes the choice once, for everyone:

* it keeps a **plan**, waypoints ``step`` apart along the ego's lane, from the ego to ``horizon``
  ahead. At each branch it takes the exit chosen before for that junction (kept in
  :attr:`Route.choices`; a lane change or a re-plan keeps the junction's exit), or else a seeded
  random one, so a run is repeatable;
* the bridge hands the plan to the Traffic Manager with ``traffic_manager.set_path`` (the
  :meth:`Route.tm_path` locations: one on each chosen exit road, then the plan's end); CARLA's
  Traffic Manager picks at each branch the exit that leads to the road of the next such location
  (``LocalizationStage::ImportPath``);
* while the Traffic Manager drives, :meth:`Route.follow_actions` compares its own upcoming actions
  (``traffic_manager.get_all_actions``) with the plan. Where it heads for another exit, the plan
  takes that exit, so the labels and the car agree even then;
* when the car leaves the planned lane (a lane change, or an exit the Traffic Manager took), the
  plan is made again from the car's lane (``map.get_waypoint``), keeping the junction exits chosen.

Waypoints are duck-typed on the ``carla.Waypoint`` attributes used (``next``, ``road_id``,
``section_id``, ``lane_id``, ``lane_width``, ``is_junction``, ``junction_id``, ``transform``), so the
module is importable and testable without ``carla``. Coordinates are CARLA's (metres, left-handed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: A branch's identity: ("junction", junction_id), or ("split", road, section, lane) where a lane
#: splits outside a junction.
BranchKey = tuple[Any, ...]
#: Where a branch leads: (road_id, lane_id) of the first waypoint past the junction.
Exit = tuple[int, int]

#: How far the plan reaches [m]. The Traffic Manager looks at most ~4 s ahead (160 m at 40 m/s,
#: ``PathBufferUpdate::HIGH_SPEED_HORIZON_RATE``), so it never runs past the planned exits.
ROUTE_HORIZON = 200.0
#: Waypoint spacing of the plan [m].
ROUTE_STEP = 2.0
#: The car is on the plan while within half a lane width plus this [m] of it (hysteresis, so that a
#: re-plan during a lane change starts from the lane the car is entering).
ON_PLAN_MARGIN = 0.3
#: ... and heading within this of the plan's [deg].
ON_PLAN_HEADING = 60.0
#: Only this much of the plan [m] ahead of its start is searched for the car (a route that loops back
#: near itself must not be matched at its far end).
ON_PLAN_SEARCH = 30.0
#: The location for the Traffic Manager is this far [m] past a junction's end, on the exit road.
TM_EXIT_OFFSET = 6.0
#: Longest junction traced to find its exit [m].
MAX_JUNCTION_LENGTH = 300.0


@dataclass
class Node:
    """One waypoint of the plan: the waypoint, its CARLA ``x, y`` [m] and ``yaw`` [deg], and the branch
    decided to reach it (``key`` on the first node after a branch, else None)."""

    wp: Any
    x: float
    y: float
    yaw: float
    key: BranchKey | None = None

    @classmethod
    def of(cls, wp: Any, key: BranchKey | None = None) -> Node:
        t = wp.transform
        return cls(wp, float(t.location.x), float(t.location.y), float(t.rotation.yaw), key)


def branch_key(before: Any, branches: list[Any]) -> BranchKey:
    """Identity of the branch point between ``before`` and its successors ``branches``."""
    inside = [b for b in branches if b.is_junction]
    if inside:
        return ("junction", int(inside[0].junction_id))
    return ("split", int(before.road_id), int(before.section_id), int(before.lane_id))


def exit_of(wp: Any, step: float = ROUTE_STEP) -> Exit:
    """(road_id, lane_id) of the first waypoint at or after ``wp`` that is outside a junction (its own
    when ``wp`` is not in one; the last one reached for a junction without an exit)."""
    cur, travelled = wp, 0.0
    while cur.is_junction and travelled < MAX_JUNCTION_LENGTH:
        nxt = cur.next(step)
        if not nxt:
            break
        cur, travelled = nxt[0], travelled + step
    return int(cur.road_id), int(cur.lane_id)


def _pick(exits: list[Exit], wanted: Exit | None) -> int | None:
    """Index of the branch that leads to ``wanted``: the same road and lane, else the same road."""
    if wanted is None:
        return None
    for i, e in enumerate(exits):
        if e == wanted:
            return i
    for i, e in enumerate(exits):
        if e[0] == wanted[0]:
            return i
    return None


class Route:
    """The ego's plan; see the module doc.

    ``update`` once per tick with the car's CARLA location and yaw; ``nodes`` / ``polyline`` give the
    plan, ``tm_path`` what to hand the Traffic Manager, and :attr:`revision` changes whenever a
    choice ahead changed (the Traffic Manager's path must then be set again). Counters:
    :attr:`replans` (plan made again from the car's lane) and :attr:`tm_divergences` (the Traffic
    Manager headed for another exit than planned; the plan followed it).
    """

    def __init__(self, seed: int = 0, step: float = ROUTE_STEP, horizon: float = ROUTE_HORIZON) -> None:
        if not (step > 0 and horizon > step):
            raise ValueError(f"route: expected 0 < step < horizon [m], got step={step!r}, horizon={horizon!r}")
        self.step = step
        self.horizon = horizon
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Node] = []
        #: Exit taken at each branch point in (or just behind) the plan.
        self.choices: dict[BranchKey, Exit] = {}
        self.revision = 0
        self.replans = 0
        self.tm_divergences = 0
        self.dead_end = False

    # ---------------------------------------------------------------------------------- queries
    def polyline(self) -> np.ndarray:
        """(N, 2) CARLA x, y [m] of the plan, in driving order."""
        return np.array([(n.x, n.y) for n in self.nodes], np.float64).reshape(-1, 2)

    def ahead(self, distance: float) -> list[Node]:
        """Plan nodes from its start (at or just behind the car) to ``distance`` [m] along it."""
        return self.nodes[:max(math.ceil(distance / self.step) + 1, 1)]

    def locate(self, x: float, y: float, yaw: float, search: float | None = ON_PLAN_SEARCH) -> int | None:
        """Index of the plan segment the point (x, y) [m] heading ``yaw`` [deg] lies on, or None.

        On the segment means within half the lane width plus :data:`ON_PLAN_MARGIN` of it, heading
        within :data:`ON_PLAN_HEADING`, and (``search`` [m]) not beyond that much of the plan.
        """
        nodes = self.nodes if search is None else self.ahead(search)
        if len(nodes) < 2:
            return None
        p = np.array([(n.x, n.y) for n in nodes], np.float64)
        seg = p[1:] - p[:-1]
        seg_len2 = np.maximum((seg * seg).sum(1), 1e-12)
        t = np.clip(((np.array([x, y]) - p[:-1]) * seg).sum(1) / seg_len2, 0.0, 1.0)
        foot = p[:-1] + t[:, None] * seg
        dist = np.hypot(foot[:, 0] - x, foot[:, 1] - y)
        heading = np.array([abs(math.remainder(yaw - n.yaw, 360.0)) for n in nodes[:-1]])
        half = np.array([0.5 * float(n.wp.lane_width) for n in nodes[:-1]]) + ON_PLAN_MARGIN
        ok = (dist <= half) & (heading <= ON_PLAN_HEADING)
        if not ok.any():
            return None
        return int(np.argmin(np.where(ok, dist, np.inf)))

    def tm_path(self) -> list[tuple[float, float, float]]:
        """CARLA locations (x, y, z [m]) for ``traffic_manager.set_path``: for each branch in the plan,
        the node :data:`TM_EXIT_OFFSET` past the junction on the chosen exit road, then the plan's end."""
        out: list[tuple[float, float, float]] = []
        n = len(self.nodes)
        for i, node in enumerate(self.nodes):
            if node.key is None:
                continue
            j = i
            while j < n - 1 and self.nodes[j].wp.is_junction:  # to the junction's end
                j += 1
            j = min(j + round(TM_EXIT_OFFSET / self.step), n - 1)
            while j > i and self.nodes[j].wp.is_junction:  # the exit road itself, not the next junction
                j -= 1
            out.append(self._location(self.nodes[j]))
        if self.nodes:
            end = self._location(self.nodes[-1])
            if not out or out[-1] != end:
                out.append(end)
        return out

    @staticmethod
    def _location(node: Node) -> tuple[float, float, float]:
        return node.x, node.y, float(node.wp.transform.location.z)

    # -------------------------------------------------------------------------------- planning
    def update(self, x: float, y: float, yaw: float, locate: Callable[[], Any]) -> bool:
        """Advance the plan to the car at CARLA (x, y) [m], ``yaw`` [deg]; ``locate()`` returns the car's
        waypoint (``map.get_waypoint``) and is called only when the plan must be made again. Returns
        True when a choice ahead changed (:attr:`revision` was bumped)."""
        k = self.locate(x, y, yaw)
        before = self.revision
        if k is None:
            if self.nodes:
                self.replans += 1
                log.info("route: the car left the planned lane at (%.1f, %.1f); planning from its lane", x, y)
            self._restart(locate())
        else:
            del self.nodes[:k]
        self._extend()
        self._prune()
        return self.revision != before

    def follow(self, wp: Any, distance: float) -> list[Any]:
        """Waypoints from ``wp`` along its lane for ``distance`` [m], taking at each branch the exit the
        plan takes (same road; a neighbouring lane's path ends where it cannot). Used for the
        neighbouring lanes' paths."""
        out, cur, travelled = [wp], wp, 0.0
        while travelled < distance:
            nxt = list(cur.next(self.step))
            if len(nxt) > 1:
                exits = [exit_of(b, self.step) for b in nxt]
                i = _pick(exits, self.choices.get(branch_key(cur, nxt)))
                if i is None:
                    break
                nxt = [nxt[i]]
            if not nxt:
                break
            cur, travelled = nxt[0], travelled + self.step
            out.append(cur)
        return out

    def planned_exit(self, junction_id: int) -> Exit | None:
        """(road_id, lane_id) at which the plan leaves junction ``junction_id``; None when it does not
        pass it."""
        inside = False
        for n in self.nodes:
            in_j = bool(n.wp.is_junction) and int(n.wp.junction_id) == junction_id
            if in_j:
                inside = True
            elif inside:
                return int(n.wp.road_id), int(n.wp.lane_id)
        return exit_of(self.nodes[-1].wp, self.step) if inside else None

    def follow_actions(self, actions: Iterable[Any], locate: Callable[[], Any]) -> bool:
        """Make the plan agree with the Traffic Manager's upcoming actions (``get_all_actions``: pairs of
        road option and ``carla.Waypoint``).

        An action waypoint in a junction lies on the Traffic Manager's own path through it; the road
        it leads to is its choice there (it compares roads, not lanes, when it follows a set path).
        Where that road differs from the plan's exit of the same junction, the plan is made again from
        the car's lane (``locate()``) taking the Traffic Manager's exit, and :attr:`tm_divergences`
        counts it. Junctions the plan does not pass are left to the on-plan test of :meth:`update`.
        Returns True when the plan changed.
        """
        changed = False
        seen: set[int] = set()
        for action in actions:
            wp = action[1] if isinstance(action, list | tuple) else action
            if wp is None or not wp.is_junction or int(wp.junction_id) in seen:
                continue
            jid = int(wp.junction_id)
            seen.add(jid)
            planned = self.planned_exit(jid)
            tm_exit = exit_of(wp, self.step)
            if planned is None or planned[0] == tm_exit[0]:
                continue
            self.choices[("junction", jid)] = tm_exit
            self._restart(locate())
            self._extend()
            self._prune()
            changed = True
            now = self.planned_exit(jid)
            if now is not None and now[0] == tm_exit[0]:
                self.tm_divergences += 1
                log.warning("route: the Traffic Manager leaves junction %d by road %d, the plan by road %d; "
                            "the plan follows the Traffic Manager", jid, tm_exit[0], planned[0])
            else:
                log.warning("route: the Traffic Manager leaves junction %d by road %d, which the car's lane "
                            "does not lead to", jid, tm_exit[0])
        return changed

    def _restart(self, wp: Any) -> None:
        self.nodes = [Node.of(wp)]
        self.dead_end = False
        self.revision += 1

    def _extend(self) -> None:
        if not self.nodes:
            return
        need = math.ceil(self.horizon / self.step) + 1
        while len(self.nodes) < need:
            last = self.nodes[-1]
            nxt = list(last.wp.next(self.step))
            if not nxt:
                if not self.dead_end:
                    log.warning("route: the lane ends %.0f m ahead (road %d lane %d)",
                                self.step * (len(self.nodes) - 1), last.wp.road_id, last.wp.lane_id)
                self.dead_end = True
                return
            if len(nxt) == 1:
                self.nodes.append(Node.of(nxt[0]))
                continue
            key = branch_key(last.wp, nxt)
            exits = [exit_of(b, self.step) for b in nxt]
            order = sorted(range(len(nxt)), key=lambda i: exits[i])  # next() has no defined order
            nxt, exits = [nxt[i] for i in order], [exits[i] for i in order]
            i = _pick(exits, self.choices.get(key))
            if i is None:
                i = int(self.rng.integers(len(nxt)))
                log.debug("route: at %s taking road %d lane %d of %s", key, *exits[i], exits)
            if self.choices.get(key) != exits[i]:
                self.choices[key] = exits[i]
            self.nodes.append(Node.of(nxt[i], key))
            self.revision += 1

    def _prune(self) -> None:
        """Forget the choices of branch points the car has passed (a route may come back to a junction
        and leave it another way)."""
        alive: set[Hashable] = {n.key for n in self.nodes if n.key is not None}
        first = self.nodes[0].wp if self.nodes else None
        if first is not None and first.is_junction:
            alive.add(("junction", int(first.junction_id)))
        for key in [k for k in self.choices if k not in alive]:
            del self.choices[key]
