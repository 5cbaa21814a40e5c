"""Recipes: the YAML a user writes, read with every key's line and column kept, validated into a `Recipe`.

`load_recipes(path)` returns one `RecipeDocument` per YAML document. A document that cannot be read or validated has
`recipe = None` and its diagnostics say why, located at the offending key; nothing raises on bad input.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vdeploy import secrets
from vdeploy.diagnostics import Diagnostic, error, warning

Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parallelism(Section):
    tensor_parallel_size: PositiveInt = 1
    pipeline_parallel_size: PositiveInt = 1
    data_parallel_size: PositiveInt = Field(1, description="replicas of the whole engine, each on its own GPUs")
    distributed_executor_backend: Literal["mp", "ray"] | None = None


class MemorySettings(Section):
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | Auto = "auto"
    max_model_len: PositiveInt | Auto = "auto"
    max_num_seqs: PositiveInt | Auto = "auto"
    max_num_batched_tokens: PositiveInt | Auto = "auto"
    block_size: Literal[1, 2, 4, 8, 16, 32, 64, 128] = 16
    swap_space: NonNegative = Field(0, description="GiB of CPU memory per GPU for swapped-out KV blocks")
    cpu_offload_gb: NonNegative = Field(0, description="GiB of weights per GPU kept in CPU memory")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    kv_cache_memory_bytes: PositiveInt | Auto = Field("auto", description="fix the KV cache size instead of sizing it")


class Runtime(Section):
    enforce_eager: bool | Auto = "auto"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0


class Server(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    api_key_env: EnvName | None = Field(None, description="name of the environment variable holding the API key")
    chat_template: str | None = None
    enable_auto_tool_choice: bool = Field(False, description="tool_choice auto: the model calls tools on its own")
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = Field(
        None, description="the model family's tool call format (hermes: Qwen2.5; llama3_json; mistral)"
    )
    trust_request_chat_template: bool = Field(
        False, description="render chat templates that requests carry (a template runs code-like Jinja: trust callers)"
    )
    embedding_prefixes: dict[str, str] | None = Field(
        None,
        description="pooling: text put before each embedding input by the request's input_type, e.g. "
        "{query: 'Query: ', passage: 'Passage: '} for jina-embeddings-v4 retrieval; /rerank uses query and passage",
    )


class Health(Section):
    path: str = "/health"
    interval: Annotated[float, Field(gt=0)] = Field(10, description="seconds between probes")
    timeout: Annotated[float, Field(gt=0)] = Field(5, description="seconds a probe may take")
    startup_timeout: Annotated[float, Field(gt=0)] = Field(900, description="seconds a replica may take to get ready")
    failure_threshold: PositiveInt = 3


class Rollout(Section):
    strategy: Literal["rolling", "blue_green"] = "rolling"
    timeout: Annotated[float, Field(gt=0)] = Field(1200, description="seconds before a rollout is abandoned")


class HardwareSpec(Section):
    profile: str
    count: PositiveInt | None = Field(None, description="GPUs on the host; defaults to the profile's")
    nodes: PositiveInt = Field(1, description="hosts of `count` GPUs each; a replica larger than one runs on Ray")


DType = Literal["auto", "half", "float16", "bfloat16", "bf16", "float", "float32"]
Quantization = Literal["awq", "awq_marlin", "gptq", "gptq_marlin", "gguf", "fp8", "bitsandbytes"]


class Recipe(Section):
    """One deployment. Field names follow vLLM's engine arguments; `auto` or an omitted field lets the compiler decide."""

    model_config = ConfigDict(extra="forbid", title="vdeploy recipe")

    name: Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")] | None = Field(
        None, description="deployment name (lowercase letters, digits, '-'); defaults to one derived from `model`"
    )
    model: Annotated[str, Field(min_length=1)] = Field(
        description="HF id, local dir, GGUF file, modelscope:<id>, or pypi:<dist>/<file> for a model shipped as a package"
    )
    served_model_name: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    runner: Literal["auto", "generate", "pooling"] = "auto"
    convert: Literal["auto", "none", "embed", "reward", "classify"] = "auto"
    dtype: DType = "auto"
    quantization: Quantization | None = None
    hardware: str | HardwareSpec = Field("auto", description="profile name, {profile, count, nodes}, or auto to detect")
    backend: Literal["builtin", "vllm"] = "builtin"
    parallelism: Parallelism = Field(default_factory=Parallelism)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    runtime: Runtime = Field(default_factory=Runtime)
    server: Server = Field(default_factory=Server)
    env: dict[str, str] = Field(default_factory=dict)
    health: Health = Field(default_factory=Health)
    rollout: Rollout = Field(default_factory=Rollout)

    @property
    def deployment_name(self) -> str:
        return self.name or derive_name(self.model)

    @property
    def hardware_profile(self) -> str:
        return self.hardware if isinstance(self.hardware, str) else self.hardware.profile

    @property
    def gpu_count(self) -> int | None:
        return None if isinstance(self.hardware, str) else self.hardware.count

    @property
    def nodes(self) -> int:
        return 1 if isinstance(self.hardware, str) else self.hardware.nodes


def derive_name(model: str) -> str:
    """A deployment name from a model reference: its last path part, lowercased, with '-' for anything else."""
    stem = re.sub(r"\.gguf$", "", model.rstrip("/").rsplit("/", 1)[-1], flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:63].strip("-") or "model"


def json_schema() -> dict[str, Any]:
    """The recipe's JSON Schema, for editors (yaml-language-server) and `vdeploy schema`."""
    schema = Recipe.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# --------------------------------------------------------------------------------------------- YAML with positions

KeyPath = tuple[str | int, ...]


@dataclass
class SourceMap:
    """Where each key of one YAML document sits: recipe path -> (line, column), 1-based. () is the document."""

    file: str
    positions: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: KeyPath) -> tuple[int | None, int | None]:
        """The position of `path`, or of its nearest ancestor that exists (a missing key points at its parent)."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.positions:
                return self.positions[path[:end]]
        return None, None

    def place(self, diagnostic: Diagnostic) -> Diagnostic:
        """The diagnostic with this document's file, line and column filled in from its `field`."""
        path = tuple(diagnostic.field.split(".")) if diagnostic.field else ()
        line, column = self.locate(path)
        return diagnostic.model_copy(update={"file": self.file, "line": line, "column": column})


@dataclass
class RecipeDocument:
    """One YAML document of a recipe file: the validated recipe (None when invalid) and what was found wrong."""

    source: SourceMap
    recipe: Recipe | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)


_constructor = yaml.constructor.SafeConstructor()
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _to_python(node: yaml.Node, path: KeyPath, source: SourceMap, problems: list[Diagnostic]) -> Any:
    """Build plain Python data from a composed YAML node, recording every key's position on the way."""
    if isinstance(node, yaml.MappingNode):
        _constructor.flatten_mapping(node)  # resolves `<<: *anchor` merges
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _constructor.construct_object(key_node, deep=True)
            key = key if isinstance(key, str | int) else str(key)
            here = (*path, key)
            source.positions[here] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in result:
                problems.append(error("VD009", f"duplicate key '{_dotted(here)}'", field=_dotted(here), hint="keep one of them"))
            result[key] = _to_python(value_node, here, source, problems)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            source.positions[(*path, index)] = (item.start_mark.line + 1, item.start_mark.column + 1)
            items.append(_to_python(item, (*path, index), source, problems))
        return items
    return _constructor.construct_object(node, deep=True)


def _dotted(path: KeyPath) -> str:
    return ".".join(str(p) for p in path)


def parse_recipes(text: str, file: str = "<recipe>") -> list[RecipeDocument]:
    """Parse and validate every document of a recipe file's text. Never raises on bad input."""
    documents: list[RecipeDocument] = []
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            source = SourceMap(file, {(): (node.start_mark.line + 1, node.start_mark.column + 1)})
            problems: list[Diagnostic] = []
            data = _to_python(node, (), source, problems)
            documents.append(_validate(data, source, problems))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        source = SourceMap(file)
        if mark is not None:
            source.positions[()] = (mark.line + 1, mark.column + 1)
        documents.append(RecipeDocument(source, None, [source.place(error("VD001", f"not valid YAML: {problem}"))]))
    finally:
        loader.dispose()
    if not documents:
        source = SourceMap(file, {(): (1, 1)})
        documents.append(RecipeDocument(source, None, [source.place(warning("VD010", "the file holds no recipe"))]))
    _check_unique_names(documents)
    return documents


def load_recipes(path: str | Path) -> list[RecipeDocument]:
    """Read a recipe file (one or more `---` documents). An unreadable file is a VD011 diagnostic, not an exception."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        source = SourceMap(str(path))
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return [RecipeDocument(source, None, [source.place(error("VD011", f"cannot read the file: {reason}"))])]
    return parse_recipes(text, str(path))


def validate_recipe(data: Any, file: str = "<recipe>") -> RecipeDocument:
    """Validate recipe data built in code (e.g. from keyword arguments): diagnostics name the field, not a line."""
    return _validate(data, SourceMap(file), [])


def _check_unique_names(documents: list[RecipeDocument]) -> None:
    first_line: dict[str, int | None] = {}
    for doc in documents:
        if doc.recipe is None:
            continue
        name = doc.recipe.deployment_name
        if name in first_line:
            where = "name" if doc.recipe.name else "model"
            message = f"a recipe named '{name}' is already defined in this file (line {first_line[name]})"
            hint = "give each deployment its own `name`"
            doc.diagnostics.append(doc.source.place(error("VD008", message, field=where, hint=hint)))
        else:
            first_line[name] = doc.source.locate(("name",) if doc.recipe.name else ())[0]


def _validate(data: Any, source: SourceMap, problems: list[Diagnostic]) -> RecipeDocument:
    if not isinstance(data, dict):
        kind = "nothing" if data is None else f"a {_yaml_kind(data)}"
        message = f"a recipe must be a mapping of fields (name, model, ...), but this document holds {kind}"
        problems.append(error("VD002", message, hint="start the document with `model: <your model>`"))
        return RecipeDocument(source, None, [source.place(d) for d in problems])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems.extend(_translate(exc, data))
        recipe = None
    if recipe is not None:
        problems.extend(_literal_secrets(recipe))
    return RecipeDocument(source, recipe, [source.place(d) for d in problems])


def _literal_secrets(recipe: Recipe) -> list[Diagnostic]:
    return [
        warning(
            "VD012",
            f"env {name} holds what looks like a secret, in plain text: it would be copied into the state directory "
            "and rendered files",
            field=f"env.{name}",
            hint=f'take it from the environment instead: `{name}: "${{{name}}}"`, and set {name} where vdeploy runs',
        )
        for name in secrets.literal_secrets(recipe.env)
    ]


def _yaml_kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "value")


# ------------------------------------------------------------------------------ pydantic errors -> diagnostics

_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_CONSTRAINTS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "string_pattern_mismatch",
                "string_too_short", "string_too_long"}


def _data_path(loc: tuple, data: Any, missing: bool) -> KeyPath:
    """The recipe path an error is about: pydantic's `loc` minus union-member tags (kept only where the data has them)."""
    path: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path.append(part)
            node = node[part]
        elif missing and i == len(loc) - 1:
            path.append(part)
    return tuple(path)


def _fields_at(path: KeyPath) -> list[str]:
    model: type[BaseModel] | None = Recipe
    for part in path:
        annotation = model.model_fields[part].annotation if model and part in model.model_fields else None
        model = next((m for m in _models_in(annotation)), None)
    return list(model.model_fields) if model else []


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _translate(exc: ValidationError, data: dict) -> list[Diagnostic]:
    """Turn pydantic's errors into one diagnostic per recipe field, with messages a user of the recipe understands."""
    grouped: dict[KeyPath, list[dict]] = {}
    for err in exc.errors():
        path = _data_path(err["loc"], data, missing=err["type"] == "missing")
        grouped.setdefault(path, []).append(err)
    # A union (`hardware: str | {profile, count}`) reports every member's error; a deeper one names the real problem.
    deepest = [p for p in grouped if not any(len(q) > len(p) and q[: len(p)] == p for q in grouped)]
    return [_diagnose(path, grouped[path]) for path in deepest]


def _diagnose(path: KeyPath, errors: list[dict]) -> Diagnostic:
    dotted = _dotted(path)
    kinds = {e["type"] for e in errors}
    if "extra_forbidden" in kinds:
        return _unknown_key(path)
    if "missing" in kinds:
        return error("VD004", f"missing required field '{dotted}'", field=dotted, hint=f"add `{path[-1]}: ...`")
    value = errors[0].get("input")
    constraint = next((e for e in errors if e["type"] in _CONSTRAINTS), None)
    if constraint:
        message = f"{dotted}: {_lower_first(constraint['msg'])}, got {value!r}"
        return error("VD005", message, field=dotted, hint=_constraint_hint(path))
    expected = []
    for e in errors:
        if e["type"] == "literal_error":
            expected.append(e["ctx"]["expected"])
        elif e["type"] in _EXPECTED:
            expected.append(_EXPECTED[e["type"]])
        else:
            expected.append(_lower_first(e["msg"]))
    expected = list(dict.fromkeys(expected))
    return error("VD005", f"{dotted}: expected {' or '.join(expected)}, got {value!r}", field=dotted)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _constraint_hint(path: KeyPath) -> str | None:
    return {
        "gpu_memory_utilization": "a fraction of GPU memory, e.g. 0.9",
        "port": "a TCP port between 1 and 65535",
        "name": "lowercase letters, digits and '-', at most 63 characters",
        "api_key_env": "the NAME of an environment variable, e.g. VDEPLOY_API_KEY",
    }.get(str(path[-1]) if path else "")


def _unknown_key(path: KeyPath) -> Diagnostic:
    dotted, key = _dotted(path), str(path[-1])
    if path == ("task",):
        hint = "`task: embed` becomes `runner: pooling` and `convert: embed`; `task: generate` becomes `runner: generate`"
        return error("VD006", "the key `task` was removed in vLLM 0.13", field=dotted, hint=hint)
    if key == "api_key":
        hint = "put the key in an environment variable and name it: `server: {api_key_env: VDEPLOY_API_KEY}`"
        return error("VD007", f"'{dotted}' would store a secret in the recipe", field=dotted, hint=hint)
    known = _fields_at(path[:-1])
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a key that belongs in a section, written at the wrong level?
        close = [f"{s}.{key}" for s in known if key in _fields_at((*path[:-1], s))]
    hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
    return error("VD003", f"unknown key '{dotted}'", field=dotted, hint=hint)
