"""Read a YAML file into a validated pydantic model, with errors that name file, field and value.

Every config in medsilo (site config, job spec, ``sites.yml``) goes through :func:`load_yaml`, so a
user sees one style of message everywhere::

    jobs/cxr.yml: training.rounds: must be greater than 0, got -3
    site.yml: privacy.required_mode: must be one of 'none', 'dp', 'ckks', 'ckks+dp', got 'ckk'
    site.yml: datasets.cxr.manifst: unknown field; did you mean 'manifest'? (allowed: manifest, modality)

A file nested deeper than :data:`MAX_YAML_DEPTH` lists or mappings is refused before PyYAML builds it (its
composer recurses once per level and would overflow Python's stack with a ``RecursionError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from medsilo.errors import MedsiloError, did_you_mean

M = TypeVar("M", bound=BaseModel)

MAX_YAML_DEPTH = 64
"""Most lists/mappings a config file may nest inside each other. medsilo's own files need 4; PyYAML's
composer overflows Python's stack a few hundred levels down."""


class ConfigError(MedsiloError):
    """A config file that cannot be used.

    Attributes:
        file: the file (or a label such as ``<job spec>`` for in-memory configs).
        problems: one ``"field: what is wrong"`` string per problem.
    """

    def __init__(self, file: str | Path, problems: list[str]):
        self.file = str(file)
        self.problems = problems
        super().__init__("; ".join(f"{self.file}: {p}" for p in problems))


HIDDEN_LOC = ("function-", "choice:")
"""Prefixes of the parts of pydantic's error locations that are not field names: validator wrappers and the
tags of unions that choose their branch from the value (e.g. ``training.augmentation``)."""


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith(HIDDEN_LOC))]
    return ".".join(parts) if parts else "(top level)"


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model inside an annotation, and whether it sits behind a ``dict[str, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    is_mapping = getattr(annotation, "__origin__", None) is dict
    for arg in getattr(annotation, "__args__", ()):
        found, inner_mapping = _model_in(arg)
        if found is not None:
            return found, is_mapping or inner_mapping
    return None, False


def _tagged(annotation: Any, tag: str) -> Any:
    """The member of a tagged union (pydantic ``Tag`` metadata) that carries ``tag``, or ``None``."""
    for arg in getattr(annotation, "__args__", ()):
        if any(getattr(meta, "tag", None) == tag for meta in getattr(arg, "__metadata__", ())):
            return arg.__origin__
        found = _tagged(arg, tag)
        if found is not None:
            return found
    return None


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the sub-model that holds the unknown key ``loc[-1]``."""
    current: type[BaseModel] | None = model
    parts = list(loc[:-1])
    while parts and current is not None:
        field = current.model_fields.get(str(parts.pop(0)))
        if field is None:
            return []
        annotation = field.annotation
        while parts and (isinstance(parts[0], int) or str(parts[0]).startswith("choice:")):
            part = parts.pop(0)  # a list index, or the branch a tagged union chose
            if isinstance(part, str):
                annotation = _tagged(annotation, part)
        current, is_mapping = _model_in(annotation)
        if is_mapping and parts:
            parts.pop(0)  # the user's key, e.g. a site or dataset name
    return list(current.model_fields) if current is not None else []


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = tuple(err["loc"])
    field = _field_name(loc)
    kind = err["type"]
    if kind == "missing":
        return f"{field}: required field is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_fields(model, loc)
        if not allowed:
            return f"{field}: unknown field; this section takes no fields"
        hint = did_you_mean(str(loc[-1]), allowed)
        return f"{field}: unknown field; {hint}(allowed: {', '.join(allowed)})"
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = msg.replace("Input should be", "must be")
    msg = msg[0].lower() + msg[1:] if msg else msg
    value = err.get("input")
    if isinstance(value, (dict, list)):
        return f"{field}: {msg}"
    return f"{field}: {msg}, got {value!r}"


def validate(
    data: Any,
    model: type[M],
    file: str | Path,
    *,
    context: dict[str, Any] | None = None,
    field_prefix: str = "",
) -> M:
    """Validate already-parsed data against ``model``; raise :class:`ConfigError` naming each bad field.

    Args:
        data: the parsed YAML/JSON object.
        model: the pydantic model class.
        file: what to call the source in messages.
        context: passed to pydantic validators (e.g. the file's directory for relative paths).
        field_prefix: dotted path of ``data`` inside its file (e.g. ``algorithm.params``), for messages.
    """
    if not isinstance(data, dict):
        where = f"{field_prefix}: expected a mapping of fields" if field_prefix else "expected a mapping of fields at the top level"
        raise ConfigError(file, [f"{where}, got {type(data).__name__}"])
    try:
        return model.model_validate(data, context={"file": Path(file), **(context or {})})
    except ValidationError as exc:
        prefix = f"{field_prefix}." if field_prefix else ""
        raise ConfigError(file, [prefix + _describe(e, model) for e in exc.errors()]) from None


def _check_depth(text: str, path: Path) -> None:
    """Refuse ``text`` if it nests more than :data:`MAX_YAML_DEPTH` collections.

    Walks the parser's event stream (the parser keeps an explicit stack, it does not recurse) and stops
    at the first collection that is too deep, before anything is composed.

    Raises:
        ConfigError: naming the line and column of that collection.
        yaml.YAMLError: the text is not valid YAML up to that point.
    """
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                mark = event.start_mark
                raise ConfigError(path, [
                    f"line {mark.line + 1}, column {mark.column + 1}: nested deeper than {MAX_YAML_DEPTH} "
                    "levels of lists/mappings; no medsilo config nests that deep, check what wrote this file"
                ])  # fmt: skip
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file.

    Raises:
        ConfigError: the file is missing or unreadable, not UTF-8, not valid YAML, or nested deeper than
            :data:`MAX_YAML_DEPTH` levels; the message names the file (and the line where known).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, ["file not found; check the path"])
    try:
        text = path.read_text(encoding="utf-8")
        _check_depth(text, path)
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(path, [f"{where}not valid YAML ({exc.problem}); fix the syntax there"]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"not valid YAML ({exc})"]) from None
    except OSError as exc:  # permission denied, a folder, an I/O error
        raise ConfigError(path, [f"cannot be read ({exc.strerror or exc}); check its permissions"]) from None


def load_yaml(path: str | Path, model: type[M]) -> M:
    """Read ``path`` and validate it as ``model`` (relative paths inside resolve against its folder)."""
    path = Path(path)
    return validate(read_yaml(path), model, path, context={"base_dir": path.resolve().parent})
