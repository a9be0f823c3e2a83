"""The CARLA bridge: conversions, recording, closed-loop control and the server loop."""
