"""``snlp quickstart`` (alias ``snlp-quickstart``): the README's main job, offline on a CPU in a few
minutes.

    prepare the bundled corpus (if DATA has no manifest.json)  ->  snlp fit --config configs/quickstart.yaml
    ->  snlp validate on the last checkpoint  ->  the sequential vs layer-parallel PPL table

Extra arguments go to both ``snlp fit`` and ``snlp validate`` (e.g. ``--trainer.max_steps 50``).
The table is also written to runs/<name>/validate.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .cli import check_config_files, run
from .module import format_table
from .errors import ArgumentParser, UserError, atomic_write_text, path_kind, run_entry

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROG = "snlp-quickstart"  # the alias's name; ``snlp quickstart`` passes its own


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The command (``prog`` names it in --help, error and status lines: ``snlp quickstart`` under ``snlp``)."""
    run_entry(prog, _main, argv, prog)


def _main(argv: list[str] | None, prog: str = PROG) -> None:
    parser = ArgumentParser(prog=prog, description="The README's main job, offline on a CPU in a few minutes.")
    parser.add_argument("--data-dir", default="data/bundled", help="prepared data (made from the bundled corpus if absent)")
    parser.add_argument(
        "--config", action="append", default=None,
        help="a config file, repeatable: later files are overlays (default: configs/quickstart.yaml)",
    )
    args, extra = parser.parse_known_args(argv)
    configs = args.config or [str(CONFIGS / "quickstart.yaml")]
    for config in configs:
        if not Path(config).is_file():
            kind = path_kind(Path(config))
            state = "not found" if kind == "missing" else f"is {kind}, not a file"
            raise UserError(f"--config {config} {state}; run from a checkout of snlp-lightning or pass --config")
    if Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is {path_kind(Path(args.data_dir))}, not a folder")
    config_args = [arg for config in configs for arg in ("--config", config)]
    check_config_files([*config_args, *extra])
    sys.argv = sys.argv[:1]  # the arguments go to the two runs below as args (LightningCLI warns otherwise)
    start = time.perf_counter()
    if not (Path(args.data_dir) / "manifest.json").is_file():
        from data_prep import PrepareOptions, prepare

        print(f"{prog}: preparing the bundled corpus into {args.data_dir}", flush=True)
        prepare(PrepareOptions(out=args.data_dir, bundled=True, vocab_size=4096))
    common = [*config_args, "--data.data_dir", args.data_dir, *extra]
    fit = run(["fit", *common])
    last = fit.trainer.checkpoint_callback.last_model_path
    validate = run(["validate", *common, "--ckpt_path", last])
    module = validate.model
    table = format_table(module.last_table, module.last_tokens, module.config.n_layer)
    report = Path(last).parents[1] / "validate.md"
    atomic_write_text(report, table + "\n")  # the validate run has already printed it
    print(f"\n{prog}: done in {time.perf_counter() - start:.0f} s; checkpoint {last}; table in {report}")
    print(f"TensorBoard: tensorboard --logdir {Path(last).parents[2]}")


if __name__ == "__main__":
    main()
