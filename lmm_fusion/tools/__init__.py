"""Front ends that measure or show the whole system: benchmark, load test, demo, and their process harness."""
