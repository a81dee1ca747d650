"""The search space of search=optuna, read from the `-m` overrides as hydra-optuna-sweeper's users write them.

    python -m mnist.run -m search=optuna 'optimizer.lr=tag(log, interval(0.01, 3))' \\
        'model.hidden=choice([64],[128],[256])' 'data.batch_size=choice(32,64,128)' trainer.epochs=5

`parse` reads the overrides with Hydra's own parser into a `Space`: the swept ones become `Param`s, the plain ones
(`trainer.epochs=5`, `model=cnn`) stay fixed in every trial. `distributions` gives Optuna's distributions (and
`grid` the GridSampler's values), `overrides` a trial's overrides back, and `check_settings` checks
conf/search/optuna.yaml's values. Each bad input is a UserError naming it and the fix.

How the sweeps map, as in hydra-optuna-sweeper:
    interval(a, b)                  float in [a, b]            tag(log, interval(a, b))       the same, log scale
    int(interval(a, b))             integer in [a, b]          tag(log, int(interval(a, b)))  the same, log scale
    range(a, b[, step])             integers a, a+step, ... below b (floats with a step, if any of the three is a float)
    choice(x, y, ...) or x,y,...    one of them (config groups too: model=choice(mlp,cnn)); shuffle(range(...)) also
Two differences: a range's stop is excluded, as in Hydra's own sweeps (range(1,4) is 1, 2, 3), for every sampler
(hydra-optuna-sweeper includes it for tpe/random and excludes it for grid); and a float range is counted in decimals as
written, so range(0.1, 0.4, 0.1) is 0.1, 0.2, 0.3 (Hydra's own float range, in binary floats, adds 0.4).

No torch; Hydra, OmegaConf and Optuna are imported only by the functions that use them.
"""
import difflib
import math
import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from mnist.config import CONF_DIR
from mnist.config import choices as group_options
from mnist.errors import UserError

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

KINDS = ("float", "int", "categorical")
# What says how the search runs, not what it searches: a fixed value is fine, a sweep is refused.
NOT_SEARCHED = ("search", "hydra", "launcher", "resources", "dry_run")
GRAMMAR = ("choice(a, b), interval(low, high), int(interval(low, high)), tag(log, interval(low, high)) "
           "or range(start, stop[, step])")
EXAMPLE = "'optimizer.lr=tag(log, interval(0.01, 3))'"
# conf/search/optuna.yaml's settings: the values each may take
DIRECTIONS = ("maximize", "minimize")
OBJECTIVES = {"accuracy": "maximize", "test_loss": "minimize"}  # and the direction each is optimised in
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "asha", "none")
_ABSENT = object()


class SearchError(UserError):
    pass


@dataclass
class Param:
    """One searched value: a float or int in [low, high] (a range's values: every `step` from low; log: on a log
    scale), or one of `choices`, each the override text Hydra reads back as the value ("[64]", "mlp", "0.1")."""

    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Param":
        param = cls(**data)
        if param.kind not in KINDS:
            raise ValueError(f"Param kind {param.kind!r} is not one of {', '.join(KINDS)}")
        return param


@dataclass
class Space:
    """What a search searches: `params` by override key (with its + or ++ if any), in the order given, and the
    `fixed` overrides every trial gets, as written."""

    fixed: list[str] = field(default_factory=list)
    params: dict[str, Param] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"fixed": list(self.fixed), "params": {name: p.to_dict() for name, p in self.params.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "Space":
        return cls(list(data["fixed"]), {name: Param.from_dict(p) for name, p in data["params"].items()})


def parse(overrides: list[str], cfg) -> Space:
    """The search space of these `-m` overrides. `cfg` is the config the fixed overrides compose (a DictConfig):
    every key searched must be in it (or be added with +), every config group choice a file in conf/<group>/."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    space = Space()
    seen: dict[str, tuple[str, bool]] = {}  # key -> (its override, swept)
    for text in overrides:
        override = _read(parser, text)
        key = _key(override)
        swept = override.is_sweep_override()
        if key in seen and (swept or seen[key][1]):
            raise SearchError(f"`{seen[key][0]}` and `{text}` both set {key}: a search gives a key either one value "
                              f"or a search space. Keep one of them.")
        seen[key] = (text, swept)
        if not swept:
            space.fixed.append(text)
            continue
        _check_searchable(override, text, key)
        group = group_of(override.key_or_group)
        param = _param(parser, override, text, group)
        if group:
            _check_group(override, text, group, param, cfg)
        else:
            _check_key(override, text, cfg)
        space.params[override.get_key_element()] = param
    if not space.params:
        given = f" (got only fixed values: {' '.join(space.fixed)})" if space.fixed else ""
        raise SearchError(f"search=optuna needs at least one parameter to search, e.g. {EXAMPLE}{given}. "
                          f"Write each as {GRAMMAR}.")
    return space


def distributions(space: Space) -> "dict[str, BaseDistribution]":
    """Optuna's distribution of each parameter, by the parameter's key."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    result = {}
    for name, p in space.params.items():
        if p.kind == "float":
            result[name] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif p.kind == "int":
            result[name] = IntDistribution(p.low, p.high, log=p.log, step=p.step or 1)
        else:
            result[name] = CategoricalDistribution(list(p.choices))
    return result


def overrides(space: Space, params: dict) -> list[str]:
    """A trial's Hydra overrides: the fixed ones, then `key=value` for each parameter (Optuna's trial.params),
    written so that Hydra reads back the very value."""
    lines = list(space.fixed)
    for name, p in space.params.items():
        if name not in params:
            raise ValueError(f"no value for the searched parameter {name} in {params}")
        value = params[name]
        if p.kind == "float" and p.step:  # on the grid, as written: 0.7, not 0.7000000000000001
            low, step = _decimal(p.low), _decimal(p.step)
            text = repr(float(low + round((_decimal(float(value)) - low) / step) * step))
        elif p.kind == "float":
            text = repr(float(value))
        elif p.kind == "int":
            text = str(int(value))
        else:
            text = str(value)
            if text not in p.choices:
                raise ValueError(f"{name}={text} is none of its choices: {', '.join(p.choices)}")
        lines.append(f"{name}={text}")
    return lines


def grid(space: Space) -> dict[str, list]:
    """The search space as optuna.samplers.GridSampler takes it: every value of each choice() and range()."""
    result = {}
    for name, p in space.params.items():
        if p.kind == "categorical":
            result[name] = list(p.choices)
        elif p.step is None:
            interval = "interval(...)" if p.kind == "float" else "int(interval(...))"
            interval = f"tag(log, {interval})" if p.log else interval
            raise SearchError(
                f"{name} is searched over an interval ({interval} from {p.low} to {p.high}), which has no grid of "
                f"values for search.sampler=grid. Give it the values to try, e.g. {name}=choice({p.low},{p.high}) "
                f"or {name}=range(start, stop, step), or search it with search.sampler=tpe."
            )
        elif p.kind == "int":
            result[name] = list(range(p.low, p.high + 1, p.step))
        else:
            low, step = _decimal(p.low), _decimal(p.step)
            count = int((_decimal(p.high) - low) / step) + 1
            result[name] = [float(low + i * step) for i in range(count)]
    return result


def check_settings(search_cfg, cpus: int | None = None) -> None:
    """Check conf/search/optuna.yaml's values (the `search` node); `cpus`: the CPUs a local search may use, which
    bound search.workers (None: not bounded, as on Slurm)."""
    n_trials = _setting(search_cfg, "n_trials")
    if not _is_int(n_trials) or n_trials < 1:
        raise SearchError(f"search.n_trials={n_trials!r} is not a positive integer: it is how many trainings the "
                          f"search runs in all. Set e.g. search.n_trials=20.")
    workers = _setting(search_cfg, "workers")
    if not _is_int(workers) or workers < 1:
        raise SearchError(f"search.workers={workers!r} is not a positive integer: it is how many trials train at "
                          f"once. Set e.g. search.workers=1.")
    if cpus is not None and workers > cpus:
        raise SearchError(
            f"search.workers={workers} would train {workers} trials at once here, but this process may use "
            f"{cpus} CPU{'s' if cpus != 1 else ''}. Set search.workers to at most {cpus}, or search on the cluster "
            f"with launcher=slurm."
        )
    direction = _one_of(search_cfg, "direction", DIRECTIONS)
    objective = _one_of(search_cfg, "objective", tuple(OBJECTIVES))
    _one_of(search_cfg, "sampler", SAMPLERS)
    _one_of(search_cfg, "pruner", PRUNERS)
    prune_after = _setting(search_cfg, "prune_after")
    if not _is_int(prune_after) or prune_after < 1:
        raise SearchError(f"search.prune_after={prune_after!r} is not a positive integer: it is how many trials must "
                          f"complete before the median pruner compares a trial with their median. Set e.g. "
                          f"search.prune_after=2.")
    seed = _setting(search_cfg, "seed")
    if seed is not None and not _is_int(seed):
        raise SearchError(f"search.seed={seed!r} is neither null nor an integer. Set search.seed=null (a new seed "
                          f"each search) or e.g. search.seed=1 (the same suggestions each time).")
    if OBJECTIVES[objective] != direction:
        other = next(o for o, d in OBJECTIVES.items() if d == direction)
        raise SearchError(
            f"search.objective={objective} with search.direction={direction} would look for the "
            f"{'worst' if objective == 'accuracy' else 'highest'} {objective.replace('_', ' ')}. "
            f"Set search.direction={OBJECTIVES[objective]} (or search.objective={other})."
        )


# -- reading the overrides ---------------------------------------------------------------------------------------

def _read(parser, text):
    """The one override `text` as Hydra parses it, or a SearchError with Hydra's own short reason."""
    from hydra.errors import OverrideParseException

    try:
        return parser.parse_overrides([text])[0]
    except OverrideParseException as e:
        lines = [line.strip() for line in str(e).splitlines()]
        reason = [line for line in lines if line and not line.startswith(("Error parsing override", "See http"))
                  and set(line) != {"^"}]
        why = re.sub(r" expecting \{[^}]*\}", "", "; ".join(reason)).rstrip(".") or "it does not parse"
        raise SearchError(f"`{text}` is not an override Hydra can read: {why}. Write key=value, or search a key "
                          f"with {GRAMMAR}, e.g. {EXAMPLE}.") from None


def _key(override) -> str:
    """The key (or config group) an override sets, with its @package if any, without + ~."""
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def group_of(key) -> str | None:
    """The config group a key names (`model`, a Space's `+model` or `model@pkg`), else None."""
    name = key.lstrip("+~").split("@")[0]
    return name if re.fullmatch(r"\w+", name) and (CONF_DIR / name).is_dir() else None


def _check_searchable(override, text, key) -> None:
    if re.split(r"[./]", override.key_or_group)[0] in NOT_SEARCHED:
        raise SearchError(
            f"`{text}`: {key} says how the search runs, not what it searches ({', '.join(NOT_SEARCHED)} and what is "
            f"under them are never searched). Give it one value, e.g. `{key}={_first_value(override)}`, and search "
            f"training settings such as {EXAMPLE}."
        )
    if override.is_delete():
        raise SearchError(f"`{text}`: ~ deletes {key} from the config, which cannot be searched. Write "
                          f"`~{key}` alone to delete it from every trial, or search it without the ~.")


def _first_value(override) -> str:
    value = override.value()
    for attribute in ("list", "start"):
        if getattr(value, attribute, None) not in (None, []):
            first = getattr(value, attribute)
            first = first[0] if attribute == "list" else first
            if isinstance(first, bool):
                return str(first).lower()
            if isinstance(first, (str, int, float)):
                return str(first)
    return "..."


def _param(parser, override, text, group) -> Param:
    from hydra.core.override_parser.types import ChoiceSweep, Glob, IntervalSweep, RangeSweep

    value = override.value()
    tags = set(getattr(value, "tags", ()) or ())
    if tags - {"log"}:
        raise SearchError(f"`{text}`: tag {', '.join(sorted(tags - {'log'}))} means nothing to search=optuna; the "
                          f"one tag it reads is log, as in tag(log, interval(0.001, 1)). Remove the other tag.")
    log = "log" in tags
    if isinstance(value, IntervalSweep):
        return _interval(value, text, override.get_key_element(), log)
    if isinstance(value, RangeSweep):
        return _range(parser, value, text, log)
    if log:
        raise SearchError(f"`{text}`: tag(log, ...) sets a log scale, which a choice does not have. Remove the tag, "
                          f"or search a scale with tag(log, interval(low, high)).")
    if isinstance(value, ChoiceSweep):
        nested = [x for x in value.list if not isinstance(x, (str, int, float, bool, list, dict))]
        if nested:
            raise SearchError(f"`{text}`: a choice lists another sweep inside it. List plain values only, "
                              f"e.g. {_key(override)}=choice(1,2,3).")
        return _categorical([_text(parser, x, text) for x in value.list], text)
    if isinstance(value, Glob):
        if group is None:
            raise SearchError(f"`{text}`: glob() picks files of a config group (e.g. model=glob(mlp*)), and "
                              f"{_key(override)} is not one. Write the values to try as choice(a, b).")
        picked = value.filter(group_options(group))
        if not picked:
            raise SearchError(f"`{text}` picks none of conf/{group}/'s files: {', '.join(group_options(group))}. "
                              f"Fix the pattern, or write {group}=choice(a, b).")
        return _categorical(picked, text)
    raise SearchError(f"`{text}`: search=optuna cannot search this kind of sweep. Write {GRAMMAR}.")


def _interval(value, text, key, log) -> Param:
    low, high = value.start, value.end
    kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
    if kind == "float":
        low, high = float(low), float(high)

    def written(a, b):
        interval = f"interval({a}, {b})" if kind == "float" else f"int(interval({a}, {b}))"
        return f"tag(log, {interval})" if log else interval

    if low == high:
        raise SearchError(f"`{text}`: the interval from {low} to {high} holds one value only. Give it as a fixed "
                          f"value, `{key}={low}`, or widen the interval.")
    if low > high:
        raise SearchError(f"`{text}`: the interval's low end {low} is above its high end {high}. Write the smaller "
                          f"value first: `{key}={written(high, low)}`.")
    if log and low <= 0:
        raise SearchError(f"`{text}`: a log scale needs a low end above 0, and this one is {low}. Start it above "
                          f"0, e.g. `{key}={written(1 if kind == 'int' else 1e-05, high)}`, or drop the log tag.")
    return Param(kind, low, high, None, log)


def _range(parser, value, text, log) -> Param:
    start, stop, step = value.start, value.stop, value.step
    if step == 0:
        raise SearchError(f"`{text}`: a range's step cannot be 0. Write e.g. range({start}, {stop}, 1).")
    floats = any(isinstance(x, float) for x in (start, stop, step))
    if floats:  # counted in decimals as written: range(0.1, 0.4, 0.1) is 0.1, 0.2, 0.3 (Hydra's own adds 0.4)
        first, by = _decimal(start), _decimal(step)
        values = _FloatRange(first, by, max(0, math.ceil((_decimal(stop) - first) / by)))
    else:
        values = range(start, stop, step)
    if not len(values):
        by = "" if abs(step) == 1 else f", {abs(step)}"
        raise SearchError(f"`{text}` has no values: counting from {start} by {step} never comes before its stop "
                          f"({stop}, which is excluded). Write e.g. range({min(start, stop)}, {max(start, stop)}{by}) "
                          f"if that is meant, or choice(...) for the values themselves.")
    if value.shuffle:  # shuffle(range(...)): its values as choices, as hydra-optuna-sweeper does
        if log:
            raise SearchError(f"`{text}`: shuffle() makes the range a choice, which has no log scale. Remove the "
                              f"log tag or the shuffle().")
        return _categorical([_text(parser, x, text) for x in sorted(values)], text)
    low, high = min(values[0], values[-1]), max(values[0], values[-1])
    if floats:
        if log:
            raise SearchError(f"`{text}`: Optuna's log scale for floats takes no step. Write "
                              f"tag(log, interval({start}, {stop})) instead.")
        return Param("float", low, high, float(abs(_decimal(step))), False)
    if log and abs(step) != 1:
        raise SearchError(f"`{text}`: Optuna's log scale for integers takes no step but 1. Write "
                          f"tag(log, int(interval({start}, {stop}))) or drop the step.")
    if log and low <= 0:
        raise SearchError(f"`{text}`: a log scale needs values above 0, and this range starts at {low}. Start it "
                          f"at 1 or above, or drop the log tag.")
    return Param("int", low, high, abs(step), log)


@dataclass
class _FloatRange:
    """first, first + by, ...: `count` floats, each computed in decimals (not summed in binary floats)."""

    first: Decimal
    by: Decimal
    count: int

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if not -self.count <= i < self.count:
            raise IndexError(i)
        return float(self.first + (i % self.count) * self.by)


def _categorical(texts, text) -> Param:
    twice = sorted({t for t in texts if texts.count(t) > 1})
    if twice:
        raise SearchError(f"`{text}` lists {', '.join(twice)} more than once. List each value once.")
    return Param("categorical", choices=list(texts))


def _text(parser, value, text) -> str:
    """The override text of one choice: what Hydra reads back as `value`."""
    from hydra.core.override_parser.types import Transformer

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    candidates = [value, f"'{value}'", f'"{value}"'] if isinstance(value, str) else [str(Transformer.encode(value))]
    for candidate in candidates:
        try:
            back = parser.parse_overrides([f"key={candidate}"])[0].value()
        except Exception:  # any failure to read it back: try the next way of writing it
            continue
        if type(back) is type(value) and back == value:
            return candidate
    raise SearchError(f"`{text}`: the choice {value!r} cannot be written back as an override. Write it without "
                      f"both kinds of quotes in it.")


def _check_group(override, text, group, param, cfg) -> None:
    if param.kind != "categorical":
        raise SearchError(f"`{text}`: {group} is a config group, whose options are the files in conf/{group}/, not "
                          f"numbers. Write {group}=choice({', '.join(group_options(group)[:2])}).")
    options = group_options(group)
    for choice in param.choices:
        if choice not in options:
            raise SearchError(f"Unknown {group} '{choice}' in `{text}`. Choose from: {', '.join(options)} (the files "
                              f"in conf/{group}/), e.g. {group}=choice({', '.join(options[:2])}).")
    if override.package is None and not override.is_add() and not override.is_force_add() and group not in cfg:
        raise SearchError(f"`{text}`: {group} is not in the config, so it is added rather than swapped: write "
                          f"`+{text}` (with a plus).")


def _check_key(override, text, cfg) -> None:
    from omegaconf import DictConfig, OmegaConf

    key = override.key_or_group
    present = OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT
    if override.is_add() and present:
        raise SearchError(f"`{text}`: the config already has {key}, so there is nothing to add. Drop the +: "
                          f"`{text.lstrip('+')}`.")
    if present or override.is_add() or override.is_force_add():
        return
    parts = key.split(".")
    depth = next(i for i in range(len(parts), -1, -1)
                 if i == 0 or OmegaConf.select(cfg, ".".join(parts[:i]), default=_ABSENT) is not _ABSENT)
    node = OmegaConf.select(cfg, ".".join(parts[:depth])) if depth else cfg
    section = ".".join(parts[:depth])
    where = f"{section} has no key '{parts[depth]}'" if section else f"the config has no top-level key '{parts[0]}'"
    fix = "Check the spelling against `python -m mnist.run --cfg job`."
    if isinstance(node, DictConfig):
        keys = sorted(map(str, node))
        where += f" (it has: {', '.join(keys)})" if keys else ""
        close = difflib.get_close_matches(parts[depth], keys, n=1)
        if close:
            fix = f"Did you mean `{'.'.join([*parts[:depth], close[0], *parts[depth + 1:]])}`?"
    raise SearchError(f"Unknown key `{key}` in `{text}`: {where}. {fix} To search a key conf/ does not have, "
                      f"write `+{text}`.")


# -- settings ----------------------------------------------------------------------------------------------------

def _setting(search_cfg, key):
    value = search_cfg.get(key, _ABSENT)
    if value is _ABSENT:
        raise SearchError(f"search.{key} is not set. conf/search/optuna.yaml sets it; set it there or with "
                          f"search.{key}=<value>.")
    return value


def _one_of(search_cfg, key, options):
    value = _setting(search_cfg, key)
    if value not in options:
        raise SearchError(f"search.{key}={value!r} is not one of: {', '.join(options)}. "
                          f"Set e.g. search.{key}={options[0]}.")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decimal(number) -> Decimal:
    """The number as written (0.1, not 0.1000000000000000055...), for steps without float noise."""
    return Decimal(repr(number))
