"""One fusion cycle, ROS-free: ingest, sync, preprocess, pipeline, assessment, safety guard."""
