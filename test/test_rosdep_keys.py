"""package.xml names only rosdep keys and ROS packages that exist in rosdistro (``rosdep install`` resolves
every one); what has no such key is pinned in requirements.txt instead.

The keys were read from ros/rosdistro (``rosdep/python.yaml``, ``jazzy/distribution.yaml``) into
``test/fixtures/rosdep_keys.txt``, with the commit; rosdistro itself is not reachable from a test run.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS_FILE = ROOT / "test" / "fixtures" / "rosdep_keys.txt"
#: Dependencies without a rosdep key that installs the pinned version: requirements.txt must pin each.
PIP_ONLY = ("onnx", "onnxruntime", "onnxscript", "safetensors", "rosbags", "mcap", "mcap-ros2-support")


def verified_keys() -> dict[str, set[str]]:
    """Section (``rosdep/python.yaml``, ``jazzy/distribution.yaml``) -> keys listed under it."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in KEYS_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = set()
        else:
            assert current is not None, f"{KEYS_FILE}: key {line!r} before a section"
            sections[current].add(line)
    return sections


def package_keys() -> dict[str, str]:
    """Every ``<*depend>`` key of package.xml -> its tag."""
    root = ET.parse(ROOT / "package.xml").getroot()
    return {el.text.strip(): el.tag for el in root if el.tag.endswith("depend") and el.text}


def test_fixture_names_the_rosdistro_commit() -> None:
    assert re.search(r"ros/rosdistro at commit [0-9a-f]{40}", KEYS_FILE.read_text())
    assert set(verified_keys()) == {"rosdep/python.yaml", "jazzy/distribution.yaml"}


def test_every_package_xml_key_exists_in_rosdistro() -> None:
    sections = verified_keys()
    known = set().union(*sections.values())
    keys = package_keys()
    assert keys, "no <*depend> in package.xml"
    unknown = sorted(k for k in keys if k not in known)
    assert not unknown, f"package.xml keys not in rosdistro (see {KEYS_FILE.name}): {unknown}"
    # System keys are rosdep keys, ROS packages are package names: neither stands in for the other.
    for key in keys:
        if key.startswith("python3-"):
            assert key in sections["rosdep/python.yaml"], key
        else:
            assert key in sections["jazzy/distribution.yaml"], key


def test_pip_only_dependencies_are_pinned_in_requirements() -> None:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    missing = [p for p in PIP_ONLY if p not in pins]
    assert not missing, f"not pinned in requirements.txt: {missing}"
    # None of them poses as a rosdep key.
    assert not [k for k in package_keys() if k.endswith("-pip")]
