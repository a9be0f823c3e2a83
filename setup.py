"""ament_python package lmm_fusion (also pip-installable into a plain venv)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "lmm_fusion"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: ["py.typed"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.rviz") + glob("config/*.xml")),
        (f"share/{PACKAGE}/config/rigs", glob("config/rigs/*.yaml")),
        (f"share/{PACKAGE}/config/train", glob("config/train/*.yaml")),
        (f"share/{PACKAGE}/models", [f for f in glob("models/**/*", recursive=True) if "." in f.rsplit("/", 1)[-1]]),
    ],
    install_requires=["setuptools"],
    extras_require={
        # TensorRT for x86-64 NVIDIA GPUs; never needed for the CPU path. On a Jetson TensorRT comes with
        # JetPack: use requirements-jetson.txt (docs/jetson.md), never these wheels. ONNX Runtime's CUDA
        # build is not an extra: onnxruntime-gpu installs the same `onnxruntime` package as the CPU build
        # in requirements.txt and the two overwrite each other. To switch, replace it:
        #   pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.31.1  (no 1.32 GPU build)
        "gpu": ["tensorrt-cu12==10.13.3.9"],
        "carla": ["carla==0.9.16"],
        # Fleet replay, compare and dataset synthesis across machines (docs/scale.md).
        "fleet": ["ray==2.60.0"],
    },
    zip_safe=True,
    maintainer="lmm_fusion maintainers",
    maintainer_email="maintainers@lmm-fusion.org",
    description="Real-time multimodal (camera, LiDAR, GNSS) fusion node for autonomous vehicles.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "lmm-fusion = lmm_fusion.cli:main",
            "fusion_node = lmm_fusion.ros.node:main",
        ],
    },
)
