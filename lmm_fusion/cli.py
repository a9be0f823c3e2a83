"""``lmm-fusion``: one command, many subcommands.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``lmm-fusion --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lmm_fusion.tools.demo", "synthesise a drive, run the real node on it over DDS, summarise"),
    "synth": ("lmm_fusion.synth.drive", "synthesise a drive (rosbag2 with ground truth)"),
    "dataset": ("lmm_fusion.synth.dataset", "synthesise many short drives for training"),
    "contact-sheet": ("lmm_fusion.synth.contact_sheet", "render a PNG of camera + BEV frames per scenario"),
    "train": ("lmm_fusion.training.train", "train the fusion model on drives"),
    # --data BAG...: lmm_fusion.training.evaluate; --fresh N: new random drives, model and published (guarded)
    "eval": ("lmm_fusion.offline.fresh", "evaluate a model on drives, or on N fresh random drives (--fresh N)"),
    "export": ("lmm_fusion.runtime.export", "export a model to ONNX and check parity"),
    "quantize": ("lmm_fusion.training.quantize", "INT8 Q/DQ ONNX calibrated on a bag"),
    "build-engine": ("lmm_fusion.runtime.tensorrt", "build (or validate) a cached TensorRT engine"),
    "bench": ("lmm_fusion.tools.bench", "benchmark every stage (JSON)"),
    "load": ("lmm_fusion.tools.loadtest", "drive the real node with full-size sensors; rate, latency, CPU, RSS"),
    "node": ("lmm_fusion.ros.node", "run the ROS 2 fusion node"),
    "play": ("lmm_fusion.ros.player", "publish a rosbag2 over DDS at its recorded pace with /clock"),
    # replay's own arguments plus --ray (lmm_fusion.offline.fleet): without --ray it is the plain replay
    "replay": ("lmm_fusion.offline.fleet", "replay bags offline through the pipeline: outputs, metrics, video"),
    "compare": ("lmm_fusion.offline.compare", "compare two models on bags: where they disagree, rendered"),
    "scale": ("lmm_fusion.offline.scaling", "fleet replay throughput on Ray with 1..N workers, and its projection"),
    "ceiling": ("lmm_fusion.offline.ceiling", "ceiling study: the expert on what the sensors show, next to the model"),
    "carla": ("lmm_fusion.carla.bridge", "drive the pipeline in a CARLA server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmm-fusion", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse only up to the subcommand; the rest belongs to the subcommand's own parser.
    ns, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name, help_text = COMMANDS[ns.command]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"lmm-fusion {ns.command}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
