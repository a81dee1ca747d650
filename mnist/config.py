"""Composing and checking configs from conf/. Imports no torch: the login node uses it."""
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mnist import registry
from mnist.errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "loss", "optimizer", "data", "resources", "launcher", "logger", "search")
# keys that moved: the old spelling is refused with a message naming the new one
# (old key: (new key, what it sets, where its defaults are now))
MOVED = {"model.time": ("resources.time", "the Slurm time limit",
                        "per model.arch defaults: time_limits in conf/resources/cpu.yaml")}
PRESETS = "experiment"  # the group of presets, added with +experiment=<name>: conf/experiment/


class ConfigError(UserError):
    pass


def choices(group) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUP_OVERRIDE = re.compile(r"(\+?)([a-z_]+)=([\w,]+)")


def _group_override(override):
    """(group, its options) of a plain `group=a,b` or `+experiment=a,b` override, else None."""
    match = GROUP_OVERRIDE.fullmatch(override)
    if match and (match.group(2) in GROUPS and not match.group(1) or match.group(2) == PRESETS):
        return match.group(2), match.group(3).split(",")
    return None


def check_choices(overrides, keys=True) -> None:
    """Name the options of a config group, and (keys=True) a key conf/ does not have, before Hydra's
    own, longer errors do.

    Only plain `group=a,b`, `+experiment=a,b` and `a.b.c=value` overrides are checked; Hydra's sweep
    syntax, other `+key=`, `++key=`, `~key` and `hydra.*` pass through to Hydra.
    """
    for override in overrides:
        picked = _group_override(override)
        if picked is None:
            continue
        group, values = picked
        plus = "+" if group == PRESETS else ""
        if group == PRESETS and not override.startswith("+"):
            raise ConfigError(f"A preset is added to the config, not swapped in: write `+{override}` "
                              f"(with a plus; conf/{PRESETS}/ has {', '.join(choices(PRESETS))}).")
        for value in values:
            if choices(group) and value not in choices(group):
                raise ConfigError(
                    f"Unknown {group} '{value}' in `{override}`. Choose one of: {', '.join(choices(group))} "
                    f"(the files in conf/{group}/), e.g. `{plus}{group}={choices(group)[0]}`."
                )
    if keys:
        check_keys(overrides)


KEY_OVERRIDE = re.compile(r"([A-Za-z_][\w-]*(?:\.[\w-]+)*)=(.*)", re.DOTALL)


def check_keys(overrides) -> None:
    """An override of a key conf/ lacks (`trainer.epoch=3`) as one paragraph naming the key, the
    keys its section has and the fix, instead of Hydra's "Key 'epoch' is not in struct" and its
    HYDRA_FULL_ERROR hint (exit status 1).

    The keys are those of the config these overrides' group choices compose (the first option
    of a sweep `group=a,b`, as Hydra's first run would). Anything this cannot judge (lists,
    values, a config that does not compose) is left to Hydra.
    """
    keyed = []
    for override in overrides:
        match = KEY_OVERRIDE.fullmatch(override)
        if not match:
            continue
        key = match.group(1)
        if key in MOVED:
            new, what, where = MOVED[key]
            raise ConfigError(f"`{override}`: {key} has moved; {what} is {new} ({where}). "
                              f"Write `{new}={override.split('=', 1)[1]}` instead.")
        if key.split(".")[0] == "hydra" or ("." not in key and key in GROUPS):
            continue
        keyed.append((key, override))
    if not keyed:
        return
    picked = []
    for override in overrides:
        group = _group_override(override)
        other = re.match(r"[+~]*([a-z_]+)(?:@[\w.]*)?=", override)
        if group:
            picked.append(f"{'+' if group[0] == PRESETS else ''}{group[0]}={group[1][0]}")
        elif other and other.group(1) in (*GROUPS, PRESETS):
            return  # a choice in sweep syntax (`model=choice(mlp,cnn)`) or appended: Hydra's to judge
    known = _plain_config(picked)
    if known is None:
        return
    for key, override in keyed:
        node, parts = known, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict):
                break  # a list index or a value: Hydra's to judge
            if part not in node:
                _unknown_key(override, parts, depth, node)
            node = node[part]


def _plain_config(group_overrides):
    """The composed config as plain dicts and lists, interpolations unresolved; None if it does not compose."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=group_overrides)
        return OmegaConf.to_container(cfg, resolve=False)
    except Exception:  # let Hydra itself report whatever this is
        return None


def _unknown_key(override, parts, depth, node):
    import difflib

    key, section, part = ".".join(parts), ".".join(parts[:depth]), parts[depth]
    where = f"{section} has no key '{part}'" if section else f"the config has no top-level key '{part}'"
    keys = sorted(map(str, node))
    close = difflib.get_close_matches(part, keys, n=1)
    value = override.split("=", 1)[1]
    if close:
        fix = f"Did you mean `{'.'.join([*parts[:depth], close[0], *parts[depth + 1:]])}={value}`?"
    else:
        fix = "Check the spelling against `python -m mnist.run --cfg job`."
    raise ConfigError(
        f"Unknown key `{key}` in `{override}`: {where}"
        f"{' (it has: ' + ', '.join(keys) + ')' if keys else ''}. {fix} "
        f"To add a key conf/ does not have, write `+{override}`."
    )


def compose(overrides=()) -> "DictConfig":
    """The config a run with these overrides gets, outside `python -m mnist.run` (tools, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_choices(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{e} (in {' '.join(overrides)})") from None
    return finalize(cfg)


def finalize(cfg) -> "DictConfig":
    """Resolve interpolations and make paths absolute, so a job elsewhere sees the same values."""
    from omegaconf import OmegaConf

    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # an interpolation such as ${oc.env:...} that cannot resolve
        raise ConfigError(f"The config does not resolve: {e}. Fix the override or the variable it names.") from None
    cfg.data.root = os.path.abspath(os.path.expanduser(str(cfg.data.root)))
    if "log_dir" in cfg.launcher:
        cfg.launcher.log_dir = os.path.abspath(os.path.expanduser(str(cfg.launcher.log_dir)))
    validate(cfg)
    return cfg


def _positive(cfg, key, kind, fix):
    value = _get(cfg, key)
    ok = isinstance(value, kind) and not isinstance(value, bool) and value > 0
    if not ok:
        raise ConfigError(f"{key}={value!r} is not a positive {_kind_name(kind)}. {fix}")


def _kind_name(kind):
    return "integer" if kind is int else "number"


def _get(cfg, key):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def _one_of(cfg, key, options, fix=""):
    value = _get(cfg, key)
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, options))}. {fix}".rstrip())


def _boolean(cfg, key):
    if not isinstance(_get(cfg, key), bool):
        raise ConfigError(f"{key}={_get(cfg, key)!r} is not true or false. Set {key}=true or {key}=false.")


def validate(cfg) -> None:
    """Check every value a run depends on; raise ConfigError naming the bad value and the fix."""
    _positive(cfg, "trainer.epochs", int, "Set e.g. trainer.epochs=3.")
    _positive(cfg, "trainer.log_interval", int, "Set e.g. trainer.log_interval=10.")
    if not isinstance(cfg.trainer.seed, int) or isinstance(cfg.trainer.seed, bool):
        raise ConfigError(f"trainer.seed={cfg.trainer.seed!r} is not an integer. Set e.g. trainer.seed=1.")
    _one_of(cfg, "trainer.device", ("auto", "cpu", "cuda"), "Set e.g. trainer.device=cpu.")
    threads = cfg.trainer.threads
    if threads != "auto":
        _positive(cfg, "trainer.threads", int, "Set trainer.threads=auto or a count such as trainer.threads=2.")

    if not (cfg.trainer.progress == "auto" or isinstance(cfg.trainer.progress, bool)):
        raise ConfigError(f"trainer.progress={cfg.trainer.progress!r} is not auto, true or false. "
                          f"Set e.g. trainer.progress=false.")
    _one_of(cfg, "trainer.precision", tuple(registry.PRECISIONS), "Set e.g. trainer.precision=bf16.")
    if cfg.trainer.precision == "fp16" and cfg.trainer.device == "cpu":
        raise ConfigError("trainer.precision=fp16 (float16 with loss scaling) needs a GPU, but trainer.device=cpu. "
                          "On a CPU use trainer.precision=bf16.")
    if cfg.trainer.precision == "fp16" and cfg.launcher.name == "slurm" and not cfg.resources.gpus_per_node:
        raise ConfigError("trainer.precision=fp16 (float16 with loss scaling) needs a GPU, but the job asks Slurm for "
                          "none (resources.gpus_per_node=0). Add resources=gpu, or use trainer.precision=bf16.")
    for key in ("trainer.channels_last", "trainer.compile"):
        _boolean(cfg, key)

    _one_of(cfg, "data.name", choices("data"), "Choose it with data=<name>.")
    if cfg.data.name not in registry.DATASETS:
        raise ConfigError(
            f"data.name={cfg.data.name} (conf/data/{cfg.data.name}.yaml) is no dataset mnist/registry.py's DATASETS "
            f"lists, so nothing knows which torchvision class fetches it or which folder under data.root holds it. "
            f"Add a line `\"{cfg.data.name}\": \"<torchvision.datasets class, e.g. KMNIST>\"` to DATASETS, or choose "
            f"one of: {', '.join(registry.DATASETS)}."
        )
    _positive(cfg, "data.batch_size", int, "Set e.g. data.batch_size=64.")
    _positive(cfg, "data.test_batch_size", int, "Set e.g. data.test_batch_size=1000.")
    _positive(cfg, "data.std", (int, float), "Set e.g. data.std=0.3081.")
    if not isinstance(cfg.data.mean, (int, float)) or isinstance(cfg.data.mean, bool):
        raise ConfigError(f"data.mean={cfg.data.mean!r} is not a number. Set e.g. data.mean=0.1307.")
    _boolean(cfg, "data.shuffle")
    if not (cfg.data.download == "auto" or isinstance(cfg.data.download, bool)):
        raise ConfigError(f"data.download={cfg.data.download!r} is not auto, true or false. Set data.download=auto "
                          f"(a run here downloads what is missing; a Slurm job never does) or data.download=false.")

    _check_model(cfg)
    _check_loss(cfg)
    _check_optimizer(cfg)
    _check_logger(cfg)


def _built(key, name, known, what, fix):
    """Refuse a name mnist/registry.py does not list: `<key>=<name> is no <what> this project builds...<fix>`."""
    if name not in known:
        raise ConfigError(f"{key}={name!r} is no {what} this project builds. Choose one of: "
                          f"{', '.join(known)}{fix}")


def _check_model(cfg):
    arch = cfg.model.arch
    _built("model.arch", arch, registry.ARCHS, "architecture", ", or pick a model with model=<name> (see conf/model/).")
    outputs = registry.ARCHS[arch].outputs
    options = registry.ARCHS[arch].options
    unknown = [key for key in cfg.model if key not in ("name", "arch", *options)]
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]} is no option of model.arch={arch} ({registry.ARCHS[arch].model_class} takes "
            f"{', '.join(options) or 'none'}). Remove it from conf/model/{cfg.model.name}.yaml or the command line, "
            f"or add it to that class and to its options in mnist/registry.py's ARCHS."
        )
    if cfg.model.output not in outputs:
        raise ConfigError(
            f"model.output={cfg.model.output!r} is not one of: {', '.join(outputs)} (what model.arch={arch} "
            f"can give). Set e.g. model.output={outputs[0]}."
        )
    if arch == "mlp":
        hidden, activations = list(cfg.model.hidden), list(cfg.model.activations)
        if len(hidden) != len(activations):
            raise ConfigError(
                f"model.hidden={hidden} has {len(hidden)} layers but model.activations={activations} "
                f"names {len(activations)}. Give one activation per hidden layer."
            )
        for i in range(len(hidden)):
            _positive(cfg, f"model.hidden.{i}", int, "Hidden layer sizes are positive integers.")
        for name in activations:
            if name not in registry.ACTIVATIONS:
                raise ConfigError(
                    f"model.activations names '{name}', which is no activation this MLP has. Choose from: "
                    f"{', '.join(registry.ACTIVATIONS)}, e.g. model.activations=[{', '.join(['relu'] * len(hidden))}]."
                )


def _check_loss(cfg):
    name, output = cfg.loss.name, cfg.model.output
    _built("loss.name", name, registry.LOSSES, "loss",
           " (loss=<name>; conf/loss/), or add it to LOSSES in mnist/registry.py.")
    fits = registry.LOSSES[name].fits
    if output not in fits:
        others = [loss for loss, entry in registry.LOSSES.items() if output in entry.fits]
        raise ConfigError(
            f"loss={name} does not fit model={cfg.model.name} with model.output={output}: {name} takes "
            f"{' or '.join(registry.GIVES[o] for o in fits)} (model.output={' or '.join(fits)}), and "
            f"model.output={output} gives {registry.GIVES[output]}. Set model.output={fits[0]} (or leave it out: "
            f"conf/model/ and conf/loss/ choose outputs that fit), or choose a loss that takes "
            f"{registry.GIVES[output]}: "
            f"{', '.join(f'loss={o}' for o in others)}."
        )
    _options(cfg, "loss", registry.LOSSES[name].options)


def _options(cfg, section, options):
    """The keys of `section` besides name, lr and scheduler: only `options`, each a number >= 0."""
    from omegaconf import OmegaConf

    given = [k for k in OmegaConf.to_container(cfg[section]) if k not in ("name", "lr", "scheduler")]
    unknown = sorted(set(given) - set(options))
    if unknown:
        name = cfg[section].name
        takes = f"takes only {', '.join(options)}" if options else "takes no options"
        raise ConfigError(
            f"{section} has {', '.join(unknown)}, which {section}={name} does not take ({name} {takes}; "
            f"mnist/registry.py). Remove it, e.g. `~{section}.{unknown[0]}`, or choose another {section}."
        )
    for option in given:
        value = cfg[section][option]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{section}.{option}={value!r} is not a number >= 0. "
                              f"Set e.g. {section}.{option}={options[option]}.")


def _check_logger(cfg):
    import importlib.util

    _one_of(cfg, "logger.name", choices("logger"), "Choose it with logger=<name>, e.g. logger=tensorboard.")
    if cfg.logger.name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "logger=tensorboard needs the tensorboard package, which this Python environment lacks. Install it "
            "with `make install` (or .venv/bin/pip install -e '.[tensorboard]'), or leave logger=tensorboard out."
        )


def _check_optimizer(cfg):
    from omegaconf import OmegaConf

    name = cfg.optimizer.name
    _built("optimizer.name", name, registry.OPTIMIZERS, "optimizer", " (the `name:` in conf/optimizer/<file>.yaml, "
           "or optimizer.name=<name>), or add it to OPTIMIZERS in mnist/registry.py.")
    _positive(cfg, "optimizer.lr", (int, float), f"Set e.g. optimizer.lr={_default_lr(name)}.")
    _options(cfg, "optimizer", registry.OPTIMIZERS[name][1])
    scheduler = OmegaConf.to_container(cfg.optimizer).get("scheduler")
    if scheduler is None:
        return
    if not isinstance(scheduler, dict):
        raise ConfigError(f"optimizer.scheduler={scheduler!r} is neither null nor a scheduler's settings. "
                          f"Set optimizer.scheduler=null, or e.g. {_scheduler_example(registry.DEFAULT_SCHEDULER)}.")
    scheduler_name = scheduler.pop("name", registry.DEFAULT_SCHEDULER)
    _built("optimizer.scheduler.name", scheduler_name, registry.SCHEDULERS, "scheduler",
           ", or set optimizer.scheduler=null.")
    _, options = registry.SCHEDULERS[scheduler_name]
    unknown = sorted(set(scheduler) - set(options))
    if unknown:
        raise ConfigError(
            f"optimizer.scheduler has {', '.join(unknown)}, which {scheduler_name} does not take. "
            f"Give it only {', '.join(options)}, e.g. {_scheduler_example(scheduler_name)}."
        )
    for option, example in options.items():
        kind = int if isinstance(example, int) else (int, float)
        _positive(cfg, f"optimizer.scheduler.{option}", kind, f"Set e.g. optimizer.scheduler.{option}={example}.")


def _scheduler_example(name):
    _, options = registry.SCHEDULERS[name]
    return f"optimizer.scheduler={{{', '.join(f'{k}: {v}' for k, v in options.items())}}}"


def _default_lr(name):
    from omegaconf import OmegaConf

    path = CONF_DIR / "optimizer" / f"{name}.yaml"
    return OmegaConf.load(path).lr if path.exists() else 0.01


@contextmanager
def report_errors() -> Iterator[None]:
    """Print a UserError as its paragraph on stderr and exit 2, instead of a traceback."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
