"""The entry point: `python -m mnist.run [overrides]` composes conf/ with Hydra, then either
trains right here (launcher=local) or submits a Slurm job (launcher=slurm).

    python -m mnist.run                                   the MLP, 3 epochs, on MNIST
    python -m mnist.run model=cnn optimizer=sgd trainer.epochs=10
    python -m mnist.run -m model=mlp,cnn                  a sweep, one run after another
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from mnist.config import CONF_DIR, check_choices, finalize, report_errors


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _run(cfg):
    run_dir = HydraConfig.get().runtime.output_dir
    with report_errors():
        cfg = finalize(cfg)
        if cfg.launcher.name == "local":
            _train_here(cfg, run_dir)
        else:
            from mnist.launch.slurm import submit

            submit(cfg, run_dir)


def _train_here(cfg, run_dir):
    from mnist.train import CHECKPOINT, train

    try:
        train(cfg, run_dir)
    except KeyboardInterrupt:
        print(
            f"\nInterrupted. {run_dir} keeps the log, config, metrics and the last finished epoch's "
            f"{CHECKPOINT}; resume with: python -m mnist.run hydra.run.dir={run_dir}",
            file=sys.stderr,
        )
        sys.exit(130)


def main(overrides=None):
    if overrides is not None:
        sys.argv = [sys.argv[0], *overrides]
    with report_errors():
        check_choices([a for a in sys.argv[1:] if not a.startswith("-")])
    _run()


if __name__ == "__main__":
    main()
