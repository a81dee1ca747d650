"""The course's plain batch scripts, slurm/<model>.sh, generated from conf/ so they always agree
with what the launcher asks for (time, CPUs and memory from conf/resources/cpu.yaml).

    python -m mnist.launch.scripts           (re)write slurm/mlp.sh and slurm/cnn.sh
    python -m mnist.launch.scripts --check   exit 1 if the committed scripts differ
"""
import sys
from pathlib import Path

from mnist import registry
from mnist.config import compose
from mnist.launch.resources import memory, signal_delay, time_seconds
from mnist.stopping import REQUEUE_EXIT, REQUEUE_SIGNAL_NAME

SLURM_DIR = Path(__file__).resolve().parent.parent.parent / "slurm"

TEMPLATE = """\
#!/bin/bash
# The course's batch script for the {upper}. From the repository root:  sbatch slurm/{name}.sh
# More overrides may follow:  sbatch slurm/{name}.sh trainer.epochs=1 data=fashion_mnist
# Generated from conf/resources/cpu.yaml (time_limits) and conf/model/{name}.yaml by `make slurm-scripts`.
#SBATCH --job-name={name}
#SBATCH --time={time}
#SBATCH --cpus-per-task={cpus}
#SBATCH --mem={mem}
#SBATCH --output=%x_%j.out
#SBATCH --error=%x_%j.err
#SBATCH --signal=B:{usr}@{signal}
#SBATCH --requeue
#SBATCH --open-mode=append

# sbatch runs this in the folder it was called from, which must be the repository root.
if [ ! -f mnist/run.py ]; then
    echo "error: run \\`sbatch slurm/{name}.sh\\` from the repository root (your mnist-slurm clone, the folder that holds mnist/ and .venv/), not from $PWD: cd there first." >&2
    exit 2
fi
source .venv/bin/activate

# {signal} s before the time limit Slurm sends {usr}: the run checkpoints where it is and exits {requeue_exit},
# and the job requeues itself (same id, run folder outputs/%x_%j and log) to resume, {requeues} times at most.
python -u -m mnist.run model={name} hydra.run.dir="outputs/${{SLURM_JOB_NAME}}_${{SLURM_JOB_ID}}" "$@" &
trap '[ "${{SLURM_RESTART_COUNT:-0}}" -lt {requeues} ] && kill -{usr} $!' {usr}
wait $!; status=$?
if [ $status -gt 128 ]; then wait $!; status=$?; fi   # the trap woke us: wait for the run to stop
if [ $status -eq {requeue_exit} ]; then scontrol requeue "$SLURM_JOB_ID"; fi
exit $status
"""


def script(name) -> str:
    resources = compose([f"model={name}", "resources=cpu"]).resources
    launcher = compose(["launcher=slurm"]).launcher
    limit = time_seconds(resources.time)
    return TEMPLATE.format(name=name, upper=name.upper(), time=resources.time, cpus=resources.cpus_per_task,
                           mem=memory(resources.mem), signal=signal_delay(launcher.signal_delay_s, limit),
                           requeues=launcher.max_requeues, usr=REQUEUE_SIGNAL_NAME, requeue_exit=REQUEUE_EXIT)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stale = []
    for name in registry.SCRIPT_MODELS:
        path = SLURM_DIR / f"{name}.sh"
        text = script(name)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            path.chmod(0o755)
            print(f"wrote {path}")
    if stale:
        print(f"{', '.join(stale)} no longer agree with conf/: run `make slurm-scripts` and commit them.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
