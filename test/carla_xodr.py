"""Small OpenDRIVE maps for the CARLA tests, read by the real client's ``carla.Map(name, xodr)``.

CARLA builds waypoints, junctions and geolocations from OpenDRIVE on the client side, so these maps
give real ``carla.Waypoint`` objects (``next``, ``is_junction``, ``junction_id`` ...) and CARLA's own
``transform_to_geolocation`` without a server.
"""

from __future__ import annotations

import math

LANE_WIDTH = 3.5
#: Junction id of :func:`fork_xodr`; its roads: 1 in, 2 (straight) and 3 (left turn) through the junction,
#: 4 (straight on, CARLA +x) and 5 (after the left turn, CARLA -y) out.
JUNCTION = 100
ROAD_IN, ROAD_STRAIGHT, ROAD_LEFT = 1, 4, 5


def _header(lat: float, lon: float) -> str:
    return ('<?xml version="1.0" standalone="yes"?><OpenDRIVE><header revMajor="1" revMinor="4" name="" version="1">'
            f'<geoReference><![CDATA[+proj=tmerc +lat_0={lat!r} +lon_0={lon!r} +k=1 +x_0=0 +y_0=0 +datum=WGS84 '
            '+units=m +no_defs]]></geoReference></header>')


def _road(rid: int, length: float, geometry: str, lanes: int, junction: int = -1,
          pred: tuple[str, int, str] | None = None, succ: tuple[str, int, str] | None = None) -> str:
    link = ""
    if pred:
        link += f'<predecessor elementType="{pred[0]}" elementId="{pred[1]}"{pred[2]}/>'
    if succ:
        link += f'<successor elementType="{succ[0]}" elementId="{succ[1]}"{succ[2]}/>'
    right = ""
    for k in range(1, lanes + 1):
        ll = ""
        if pred and pred[0] == "road":
            ll += f'<predecessor id="-{k}"/>'
        if succ and succ[0] == "road":
            ll += f'<successor id="-{k}"/>'
        mark = "broken" if k < lanes else "solid"
        right += (f'<lane id="-{k}" type="driving" level="false"><link>{ll}</link>'
                  f'<width sOffset="0" a="{LANE_WIDTH}" b="0" c="0" d="0"/>'
                  f'<roadMark sOffset="0" type="{mark}" weight="standard" color="standard" width="0.15" '
                  'laneChange="both"/></lane>')
    return (f'<road name="" length="{length!r}" id="{rid}" junction="{junction}"><link>{link}</link>'
            f'<planView>{geometry}</planView><lanes><laneSection s="0"><left/><center>'
            f'<lane id="0" type="none" level="false"/></center><right>{right}</right></laneSection></lanes></road>')


def straight_xodr(lat: float = 49.0, lon: float = 8.0, length: float = 200.0) -> str:
    """One straight one-way road along CARLA +x from the origin, one lane, geo-referenced at (lat, lon)."""
    road = _road(1, length, f'<geometry s="0" x="0" y="0" hdg="0" length="{length!r}"><line/></geometry>', 1)
    return _header(lat, lon) + road + "</OpenDRIVE>"


def fork_xodr(lanes: int = 2, lat: float = 49.0, lon: float = 8.0) -> str:
    """A one-way road (CARLA +x, lanes -1..-``lanes``) that forks at x = 50 m: straight on (road 4) or a
    quarter turn to the left (radius 20 m, road 5, heading CARLA -y = north). Connecting roads 2 and 3
    form junction :data:`JUNCTION`."""
    q = math.pi * 20.0 / 2.0
    end = ' contactPoint="end"'
    start = ' contactPoint="start"'
    roads = [
        _road(1, 50.0, '<geometry s="0" x="0" y="0" hdg="0" length="50"><line/></geometry>', lanes,
              succ=("junction", JUNCTION, "")),
        _road(2, 20.0, '<geometry s="0" x="50" y="0" hdg="0" length="20"><line/></geometry>', lanes, JUNCTION,
              pred=("road", 1, end), succ=("road", 4, start)),
        _road(3, q, f'<geometry s="0" x="50" y="0" hdg="0" length="{q!r}"><arc curvature="0.05"/></geometry>',
              lanes, JUNCTION, pred=("road", 1, end), succ=("road", 5, start)),
        _road(4, 150.0, '<geometry s="0" x="70" y="0" hdg="0" length="150"><line/></geometry>', lanes,
              pred=("junction", JUNCTION, "")),
        _road(5, 150.0, f'<geometry s="0" x="70" y="20" hdg="{math.pi / 2!r}" length="150"><line/></geometry>',
              lanes, pred=("junction", JUNCTION, "")),
    ]
    links = "".join(f'<laneLink from="-{k}" to="-{k}"/>' for k in range(1, lanes + 1))
    junction = (f'<junction id="{JUNCTION}" name="">'
                f'<connection id="0" incomingRoad="1" connectingRoad="2" contactPoint="start">{links}</connection>'
                f'<connection id="1" incomingRoad="1" connectingRoad="3" contactPoint="start">{links}</connection>'
                '</junction>')
    return _header(lat, lon) + "".join(roads) + junction + "</OpenDRIVE>"
