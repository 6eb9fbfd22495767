"""What every binary in bin/ shares: one flag vocabulary, one-line errors, ``--debug``, checks.

Flags. A setting has one flag name in every binary that takes it, defined here once per group:
:func:`define_dataset_flag`, :func:`define_data_flags`, :func:`define_output_flag`,
:func:`define_search_flags` (the V search), :func:`define_rat_flags`, :func:`define_adv_flags`
(FGSM-AT / PGD-AT), :func:`define_strategy_flags`, :func:`define_n_test_flag` and
:func:`define_eval_flags` (the robustness report, one flag per ``EvalSettings`` field); a
binary's own flags go through :func:`define`. Each flag records what it sets (``sets``: a
dataclass such as ``TrainConfig``, whose field it fills, a function, whose argument it fills, or
a short description), and its default is read from there: the dataclass field's default or the
argument's, never a number written again here (None where the library decides later: the
dataset's radius, the budget preset). :func:`values` collects the settings of one target, so a
binary builds its config as ``TrainConfig(**cli.values(TrainConfig))``. The flag table of
BUILD.md is generated from these definitions (:func:`flag_table`, ``bin/flag_table.py``).

Errors. ``cli.run(main)`` replaces ``app.run(main)``: a usage error (a bad or unknown flag, a
missing file, an unknown dataset: ``UsageError``, absl flag errors, ``ValueError``,
``FileNotFoundError``, ``FileExistsError``) prints one line ``error: ...`` on stderr and exits
with status 2; any other ``OSError`` (a full disk, say) prints one line and exits with status 1.
``--debug`` shows the full traceback instead.

The ``check_*`` functions run before any work: every input exists, every output folder takes a
file, the data files are there; each failure is a usage error that names its flag.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import runpy
import sys
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

import numpy as np
from absl import app, flags

from rat_tf import data, distribute, evaluation, files
from rat_tf.flag_groups import (ADV_FLAGS, COMPUTE_FLAGS, DATA_FLAGS, DATA_SOURCES, DATASET_FLAG,
                                EVAL_FLAGS, RAT_FLAGS, RECIPE_FLAGS, SEARCH_FLAGS, STRATEGY_FLAGS,
                                Spec)  # re-exported: DATA_SOURCES, the groups

FLAGS = flags.FLAGS
USAGE_ERRORS = (app.UsageError, flags.Error, ValueError, FileNotFoundError, FileExistsError)
USAGE_STATUS = 2  # bad input: flags, files, names
FAILURE_STATUS = 1  # the run itself failed (e.g. a full disk)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (its type name when it has no message)."""
    return " ".join(str(error).split()) or type(error).__name__


def fail(message: str, status: int = USAGE_STATUS) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``status``."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with flag errors as one line and status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(one_line(e))


def _main_module() -> str:
    """The module name absl gives the running binary (its --help lists that module's flags)."""
    return sys.argv[0]


# --------------------------------------------------------------------------- defining flags
LIBRARY = object()  # default of :func:`define`: read it from what the flag sets
Target = Any  # a dataclass, a function, or a description (str) of what a flag sets

SETS: dict[str, tuple[Target, str]] = {}  # flag name -> (target, field) of the flags defined


def _target_name(target: Target) -> str:
    return target if isinstance(target, str) else target.__name__


def _has_field(target: Target, field: str) -> bool:
    if dataclasses.is_dataclass(target):
        return field in {f.name for f in dataclasses.fields(target)}
    if callable(target):
        return field in inspect.signature(target).parameters
    return True


def library_default(target: Target, field: str) -> Any:
    """The default of ``field`` in ``target``: a dataclass field's or a function argument's
    (None for one without a default)."""
    if dataclasses.is_dataclass(target):
        for f in dataclasses.fields(target):
            if f.name == field:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
                return None
    elif callable(target) and field in inspect.signature(target).parameters:
        value = inspect.signature(target).parameters[field].default
        return None if value is inspect.Parameter.empty else value
    raise ValueError(f"{_target_name(target)} has no setting {field!r} to take a default from")


def describe_target(target: Target | None, field: str | None = None) -> str:
    """``training.TrainConfig.epochs``, ``data.load_arrays(source)``, or the description (a
    target of a rat_tf package is named by the package: ``evaluation.EvalSettings``)."""
    if target is None:
        return ""
    if isinstance(target, str):
        return target
    parts = target.__module__.split(".")
    module = parts[1] if parts[0] == "rat_tf" and len(parts) > 1 else parts[-1]
    if dataclasses.is_dataclass(target):
        return f"{module}.{target.__name__}.{field}"
    return f"{module}.{target.__name__}({field})"


def _preset_fields(target: Target, preset: bool) -> set[str]:
    """The fields of ``target`` a budget preset of ``rat_tf.experiment`` fills: those of
    ``ExperimentConfig``, and with ``preset`` the evaluation overrides of ``EvalSettings``."""
    name = _target_name(target)
    if name != "ExperimentConfig" and not (preset and name == "EvalSettings"):
        return set()
    from rat_tf import experiment  # the pipeline, only where its presets are asked for

    out: set[str] = set()
    for family in experiment.PRESETS.values():
        for budget in family.values():
            out |= set(budget.get("eval", {})) if name == "EvalSettings" else set(budget)
    return out - {"eval"}


def _unset_note(target: Target | None, field: str, unset: str | None, per_dataset: bool,
                preset: bool) -> str:
    """What an unset (None) flag means: the dataset's, the budget preset's, ``unset``, or the
    library's default."""
    if per_dataset:
        return "Unset: the dataset's."
    if target is not None and field in _preset_fields(target, preset):
        return f"Unset: the budget preset's{', else ' + unset if unset else ''}."
    if unset:
        return f"Unset: {unset}."
    if target is None or isinstance(target, str):
        return ""
    default = library_default(target, field)
    return "Unset: the library's default." if default is None else (
        f"Unset: {_cell(default).strip('`')}.")


def define(kind: str, name: str, help: str, *, sets: Target | None = None,
           field: str | None = None, default: Any = LIBRARY,
           values: Iterable[str] | None = None, required: bool = False,
           unset: str | None = None, per_dataset: bool = False, preset: bool = False,
           **kwargs: Any) -> None:
    """Define ``--name`` for the running binary (listed by its --help).

    ``kind``: string, integer, float, bool, enum (one of ``values``) or list. ``sets``: what the
    flag sets, with ``field`` (default ``name``); the default is then the library's
    (:func:`library_default`) unless ``default`` is given. A None default gets a note of what
    it means: ``unset``, the dataset's (``per_dataset``), the budget preset's (for
    ``ExperimentConfig``; with ``preset``, the evaluation overrides of ``bin/experiment.py``).
    ``kwargs``: absl's (``lower_bound``).
    """
    field = field or name
    if default is LIBRARY:
        if sets is None or isinstance(sets, str):
            raise ValueError(f"--{name}: give a default (it sets no library field)")
        default = None if per_dataset else library_default(sets, field)
    if isinstance(default, tuple):
        default = list(default)
    if default is None and not required:
        help = f"{help} {_unset_note(sets, field, unset, per_dataset, preset)}".strip()
    common = dict(module_name=_main_module(), required=required, **kwargs)
    if kind == "enum":
        flags.DEFINE_enum(name, default, list(values), help, **common)
    else:
        define_fn = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
                     "float": flags.DEFINE_float, "bool": flags.DEFINE_bool,
                     "list": flags.DEFINE_list}[kind]
        define_fn(name, default, help, **common)
    if sets is not None:
        SETS[name] = (sets, field)


def values(target: Target) -> dict[str, Any]:
    """{field: value} of the flags that set ``target``, unset (None) ones left out: the library
    default stands for them. Lists become tuples."""
    out = {}
    for name, (t, field) in SETS.items():
        if t is target and name in FLAGS and FLAGS[name].value is not None:
            value = FLAGS[name].value
            out[field] = tuple(value) if isinstance(value, list) else value
    return out


def given_values(target: Target) -> dict[str, Any]:
    """{field: value} of the flags that set ``target`` and were given on the command line."""
    return {field: value for field, value in values(target).items()
            if any(FLAGS[name].present for name, (t, f) in SETS.items()
                   if t is target and f == field and name in FLAGS)}


def _define_group(specs: Mapping[str, Spec], target: Target, *,
                  only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                  defaults: Mapping[str, Any] | None = None, preset: bool = False,
                  required: Iterable[str] = ()) -> None:
    """Define the flags of ``specs`` that set ``target`` (a flag whose field the target does not
    have is left out); ``defaults`` replaces the library's; ``preset``: see :func:`define`."""
    names = list(specs) if only is None else list(only)
    unknown = set(names) - set(specs)
    if unknown:
        raise ValueError(f"no flags {sorted(unknown)} in this group")
    defaults = dict(defaults or {})
    for name in names:
        spec = specs[name]
        field = spec.fields.get(_target_name(target), name)
        if name in exclude or not _has_field(target, field):
            continue
        define(spec.kind, name, spec.help, sets=target, field=field,
               default=defaults.get(name, LIBRARY), values=spec.values,
               required=name in required, unset=spec.unset, per_dataset=spec.per_dataset,
               preset=preset,
               **({} if spec.lower_bound is None else {"lower_bound": spec.lower_bound}))


def define_dataset_flag(target: Target, *, default: Any = LIBRARY, required: bool = False,
                        help: str = "", unset: str | None = None) -> None:
    """``--dataset``, one of ``rat_tf.data.DATASETS``; ``help`` adds to the shared text,
    ``unset`` says what None means."""
    spec = DATASET_FLAG["dataset"]
    spec = dataclasses.replace(spec, help=f"{spec.help} {help}".strip(), unset=unset)
    _define_group({"dataset": spec}, target, required=["dataset"] if required else (),
                  defaults=None if default is LIBRARY else {"dataset": default})


def define_data_flags(target: Target = data.load_arrays, data_source: bool = True) -> None:
    """``--data_dir``, ``--verify_checksums`` and (with ``data_source``) ``--data_source``.

    ``--verify_checksums`` sets the data readers' default (``data.set_verify_checksums``)
    before ``main`` runs (:func:`run`), so every read of the binary checks the md5s.
    """
    _define_group(DATA_FLAGS, target, only=["data_dir"])
    _define_group(DATA_FLAGS, data.set_verify_checksums, only=["verify_checksums"],
                  defaults={"verify_checksums": False})
    if data_source:
        _define_group(DATA_FLAGS, target, only=["data_source"])


def define_output_flag(what: str, *, sets: Target | None = None, field: str = "output_dir",
                       default: Any = None, required: bool = False,
                       unset: str | None = None) -> None:
    """``--output_dir``: the folder a binary writes its results to (``what``)."""
    define("string", "output_dir", f"Folder the results are written to: {what}.", sets=sets,
           field=field, default=default, required=required, unset=unset)


def define_search_flags(target: Target, **group: Any) -> None:
    """The V search: ``--eps``, ``--norm``, ``--search_method``, ``--search_passes``,
    ``--search_delta``, ``--search_step_size``, ``--search_inner_steps``, ``--per_source``
    (those ``target`` has; ``group``: ``only``, ``exclude``, ``defaults``)."""
    _define_group(SEARCH_FLAGS, target, **group)


def define_rat_flags(target: Target, **group: Any) -> None:
    """RAT training: ``--refresh_every``, ``--refresh_passes``, ``--targets_per_image``,
    ``--perturbed_fraction``, ``--batch_mode``, ``--online``, ``--online_step_size``,
    ``--rat_init``, ``--rat_step_size``, ``--rat_consistency``, ``--rat_init_noise``,
    ``--rat_step_loss``, ``--rat_carry``, ``--rat_carry_noise``."""
    _define_group(RAT_FLAGS, target, **group)


def define_recipe_flags(target: Target, **group: Any) -> None:
    """The training recipe: ``--augment``, ``--warmup_epochs``, ``--weight_decay``,
    ``--label_smoothing``, ``--ema_momentum``, ``--test_every``."""
    _define_group(RECIPE_FLAGS, target, **group)


def define_adv_flags(target: Target, **group: Any) -> None:
    """FGSM-AT / PGD-AT: ``--adv_eps``, ``--adv_steps``, ``--adv_step_size``,
    ``--adv_init_scale``, ``--adv_box_start``, ``--adv_project``, ``--adv_freeze_fooled``,
    ``--early_stop_drop``,
    ``--early_stop_images`` (those ``target`` has)."""
    _define_group(ADV_FLAGS, target, **group)


def define_strategy_flags(target: Target | None = None, *, tpu: bool = False) -> None:
    """``--strategy``, ``--num_cpu_devices`` (and ``--tpu``) of :func:`strategy`; with a
    ``target``, ``--precision`` and ``--jit_compile`` where it has them."""
    _define_group(STRATEGY_FLAGS, distribute.get_strategy, exclude=() if tpu else ["tpu"])
    if target is not None:
        _define_group(COMPUTE_FLAGS, target)


def define_n_test_flag(target: Target, *, default: Any = LIBRARY) -> None:
    """``--n_test``, the test images used (the first N of the test split; 0: all)."""
    _define_group(EVAL_FLAGS, target, only=["n_test"],
                  defaults=None if default is LIBRARY else {"n_test": default})


def define_eval_flags(*, preset: bool = False, **group: Any) -> None:
    """The robustness report's settings: one flag per ``EvalSettings`` field, named as it.

    Defaults are ``EvalSettings``'s (the radii: None, the dataset's); with ``preset``
    (bin/experiment.py) every one is None: the budget preset's, then the library's.
    """
    if preset:
        group["defaults"] = {name: None for name in EVAL_FLAGS}
    _define_group(EVAL_FLAGS, evaluation.EvalSettings, preset=preset, **group)


def _define_debug() -> None:
    if "debug" not in FLAGS:
        define("bool", "debug", "Show the full traceback of an error instead of one line.",
               default=False)


# --------------------------------------------------------------------------- using flags
def strategy() -> Any:
    """The ``tf.distribute`` strategy of the strategy flags."""
    return distribute.get_strategy(**values(distribute.get_strategy))


def eval_settings(dataset: str) -> evaluation.EvalSettings:
    """The ``EvalSettings`` of the evaluation flags given for ``dataset`` (0: all images)."""
    given = values(evaluation.EvalSettings)
    given.pop("dataset", None)  # --dataset, when it sets EvalSettings.dataset: ``dataset``
    every = {name: None for name, spec in EVAL_FLAGS.items()
             if spec.zero_is_all and given.get(name) == 0}
    settings = evaluation.EvalSettings.for_dataset(
        dataset, **{k: v for k, v in given.items() if k not in every})
    return dataclasses.replace(settings, **every) if every else settings


def int_list(name: str, low: int, high: int | None = None) -> list[int] | None:
    """The values of list flag ``--name`` as ints in [low, high) (None if unset), or a usage
    error naming it."""
    if FLAGS[name].value is None:
        return None
    try:
        out = [int(v) for v in FLAGS[name].value]
    except ValueError as e:
        raise app.UsageError(f"--{name}: {e}") from e
    if any(v < low or (high is not None and v >= high) for v in out):
        raise app.UsageError(f"--{name} values must be in [{low}, {high or 'inf'}), got {out}")
    return out


def balanced_subset(x: np.ndarray, y: np.ndarray, total: int, num_classes: int, seed: int,
                    flag: str = "train_subset") -> tuple[np.ndarray, np.ndarray]:
    """``total`` images, as many of each class (0: all of them), or a usage error naming
    ``--flag``; the subset ``bin/train.py --train_subset`` draws with the same seed."""
    if total % num_classes:
        raise app.UsageError(f"--{flag} must be a multiple of the {num_classes} classes (a "
                             f"balanced subset), got {total}")
    if not total:
        return x, y
    return data.balanced_subset(x, y, total // num_classes, seed, num_classes)


def run(main: Callable[[list[str]], int | None]) -> None:
    """``app.run(main)`` with usage errors as one line ``error: ...`` (see the module doc)."""
    _define_debug()

    def guarded(argv: list[str]) -> int | None:
        try:
            if "verify_checksums" in SETS:
                data.set_verify_checksums(FLAGS.verify_checksums)
            return main(argv)
        except USAGE_ERRORS as e:
            if FLAGS.debug:
                raise
            fail(one_line(e))
        except OSError as e:
            if FLAGS.debug:
                raise
            fail(one_line(e), FAILURE_STATUS)

    app.run(guarded, flags_parser=_parse_flags)


# --------------------------------------------------------------------------- the flag table
def binary_flags(path: str) -> list[dict[str, Any]]:
    """The flags the binary at ``path`` defines, each a dict of name, sets, default and help
    (its module runs under another name, so its ``main`` does not; ``--debug`` included)."""
    before, sets_before = set(FLAGS), dict(SETS)
    try:
        runpy.run_path(path, run_name="__flag_table__")
        _define_debug()
        rows = [{"name": name, "sets": describe_target(*SETS.get(name, (None, None))),
                 "default": FLAGS[name].default, "help": FLAGS[name].help}
                for name in sorted(set(FLAGS) - before | {"debug"})]
    finally:
        for name in set(FLAGS) - before:
            delattr(FLAGS, name)
        SETS.clear()
        SETS.update(sets_before)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, bool):
        value = str(value).lower()
    text = '""' if value == "" else str(value)
    return f"`{text}`"


def flag_table(paths: Sequence[str]) -> str:
    """A Markdown table of every flag of the binaries at ``paths``: which binaries take it,
    what it sets ("-": a setting of the binary itself), its default and its help; a flag that
    sets another thing, has another default or another help in some binaries has a row for
    each."""
    rows: dict[tuple[str, str, str, str], list[str]] = {}
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    for path, binary in zip(paths, names):
        for flag in binary_flags(path):
            key = (flag["name"], flag["sets"], _cell(flag["default"]), flag["help"])
            rows.setdefault(key, []).append(binary)
    lines = ["| flag | binaries | sets | default | meaning |", "|---|---|---|---|---|"]
    for (name, sets, default, help), binaries in sorted(rows.items()):
        where = "all" if sorted(binaries) == sorted(names) else ", ".join(sorted(binaries))
        cells = [f"`--{name}`", where, f"`{sets}`" if sets else "-", default, help]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- checks before work
def _paths(value: str | Iterable[str] | None) -> list[str]:
    """The paths of a flag value: none for None or "", one for a string, each of a list."""
    if not value:
        return []
    return [value] if isinstance(value, str) else [p for p in value if p]


def check_inputs(**paths: str | Iterable[str] | None) -> None:
    """Raise a usage error naming the flag unless every path given (by flag name) exists."""
    for flag, value in paths.items():
        for path in _paths(value):
            if not os.path.exists(path):
                raise app.UsageError(f"--{flag}: {path} does not exist")


def check_output_dirs(**folders: str | Iterable[str] | None) -> None:
    """Create each output folder given (by flag name) and prove it writable, or a usage error."""
    for flag, value in folders.items():
        for folder in _paths(value):
            try:
                files.check_writable_dir(folder)
            except OSError as e:
                raise app.UsageError(f"--{flag}: {e.strerror or e}") from e


def check_output_files(**paths: str | Iterable[str] | None) -> None:
    """Prove the folder of each output file or directory given (by flag name) writable."""
    check_output_dirs(**{flag: [os.path.dirname(os.path.abspath(p)) for p in _paths(value)]
                         for flag, value in paths.items()})


def check_data(dataset: str, data_dir: str | None = None, data_source: str = "files",
               splits: Sequence[str] = data.SPLITS) -> None:
    """Raise the data readers' error now if the dataset is unknown or a split's files are missing.

    Only names and folders are checked (the files are read, and validated, by the work itself);
    with ``data_source="tfds"`` only the name.
    """
    data.get_info(dataset)
    if data_source != "tfds":
        for split in splits:
            data.locate_files(dataset, split, data_dir)
