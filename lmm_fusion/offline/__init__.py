"""Offline front ends: rosbag replay and rendering."""
