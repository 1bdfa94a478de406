"""The package's layers, read off its import statements (parsed with `ast`, nothing is imported):

(i)   no import cycles among clip_jax's modules, counting imports made inside functions too (a
      cycle hidden in a function is still a cycle: it only moves the failure to run time);
(ii)  nothing outside clip_jax/training/ imports clip_jax.training except the programs that train:
      clip_jax/experiments/clip_runs.py (the paper experiments' models) and clip_jax/aot/compile.py
      (the train step compiled ahead of time); train.py and bench/ are outside the package;
(iii) imports at module level: inside a function, only the heavy optional dependencies below;
(iv)  the layers of LAYERS: no module imports one of a higher layer.

An edge goes from a module to each clip_jax module it names: `from clip_jax.evaluation import
suite` is an edge to clip_jax.evaluation.suite, `from clip_jax.models import CLIP` one to
clip_jax.models (the package, whose __init__ defines CLIP). Parent packages executed on the way
are not counted, as import-linter does not count them: every module would otherwise depend on
clip_jax/__init__.py.
"""

from __future__ import annotations

import ast
import dataclasses
import os

PACKAGE = "clip_jax"
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

TRAINING = f"{PACKAGE}.training"
# The only modules outside clip_jax/training/ that may import it, the programs that train:
# clip_jax/experiments/clip_runs.py drives training runs for the paper's experiments, and
# clip_jax/aot/ compiles the train step that training/ builds, for hardware this machine does not
# have. Both sit on top of every other layer. Training workdirs are read by clip_jax.io.
TRAINING_IMPORTERS = {f"{PACKAGE}.experiments.clip_runs", f"{PACKAGE}.aot.compile"}

# The package's layers, lowest first: a module may import its own layer and those below it, never
# one above. A name stands for the module and everything under it (a package's modules).
LAYERS: tuple[tuple[str, ...], ...] = (
    # the base: models, tokenizers (their vocabulary files and text cleaning), image transforms,
    # paths, sharding rules and the collectives the losses run over the mesh, the TorchScript
    # reader, and the settings schema (a frozen dataclass as a ConfigDict and back)
    (
        "paths",
        "cli",
        "settings_schema",
        "sharding",
        "collectives",
        "models",
        "tokenizer",
        "tokenizer_files",
        "text_cleaning",
        "transforms",
        "torchscript",
    ),  # fmt: skip
    ("data", "losses", "metrics"),  # the data pipeline (and its prompt templates), objectives, logs
    ("io",),  # reading and writing models in every format: `load_any`
    ("captioning",),
    ("evaluation",),
    ("training",),
    ("api", "convert"),  # the public API and the converter's command line
    ("experiments", "aot"),  # the programs
    ("",),  # the package's __init__ (clip_jax), which re-exports the public API
)

# Imported where they are used, never at the top of a module: optional dependencies whose import
# costs seconds, or that not every install has.
HEAVY_OPTIONAL = {
    "torch",  # reading and writing pickled PyTorch checkpoints (io, convert)
    "tensorflow",  # TFDS's tf.data reader (data/tfds.py)
    "tensorflow_datasets",  # TFDS datasets (data/, evaluation/retrieval.py)
    "matplotlib",  # evaluate.py's plots (evaluation/report.py)
    "transformers",  # Hugging Face references
    "open_clip",  # open_clip references
    "tensorboardX",  # its package imports torch whenever torch is installed (metrics.py)
}

# Paths exempt from rule (iii): none; the tuple stays for a module on its way there.
FUNCTION_LEVEL_IMPORTS_IN_PROGRESS: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str  # the module holding the statement, e.g. clip_jax.convert
    path: str  # its file, relative to the repository, e.g. clip_jax/convert/__init__.py
    line: int
    name: str  # the module as the statement names it, e.g. jax.experimental.multihost_utils
    target: str  # the module imported: a clip_jax module's full name, else the top-level package
    in_function: bool

    def __str__(self) -> str:
        where = "inside a function" if self.in_function else "at module level"
        return f"{self.path}:{self.line} imports {self.name} {where}"


def _module_files() -> dict[str, str]:
    """{module name: path relative to the repository} of every module of the package."""
    modules = {}
    root = os.path.dirname(PACKAGE_DIR)
    for directory, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if not name.endswith(".py"):
                continue
            relative = os.path.relpath(os.path.join(directory, name), root)
            parts = relative[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = relative.replace(os.sep, "/")
    return modules


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].endswith("/__init__.py")


def _resolve(importer: str, node: ast.Import | ast.ImportFrom) -> list[tuple[str, str]]:
    """(name, target) of each module one import statement names: the name as written (with the
    imported name if it is a clip_jax module), the target a clip_jax module or a top package."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importer's package, one level up per extra dot
            package = importer if _is_package(importer) else importer.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = []
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            names.append(submodule if submodule in MODULES else base)
    targets = []
    for name in dict.fromkeys(names):  # `from m import a, b` names m once
        if name.split(".")[0] != PACKAGE:
            targets.append((name, name.split(".")[0]))
            continue
        # `import clip_jax.a.b` names clip_jax.a.b; keep the longest part that is a module.
        parts = name.split(".")
        while ".".join(parts) not in MODULES:
            parts.pop()
        targets.append((name, ".".join(parts)))
    return targets


def _imports(module: str) -> list[Import]:
    path = MODULES[module]
    with open(os.path.join(os.path.dirname(PACKAGE_DIR), path), encoding="utf-8") as file:
        tree = ast.parse(file.read(), filename=path)
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name, target in _resolve(module, child):
                    if target != "__future__":
                        found.append(Import(module, path, child.lineno, name, target, in_function))
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inside)

    visit(tree, False)
    return found


IMPORTS = [statement for module in sorted(MODULES) for statement in _imports(module)]


def _internal_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for statement in IMPORTS:
        if statement.target in MODULES and statement.target != statement.importer:
            graph[statement.importer].add(statement.target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[tuple[set[str], list[str]]]:
    """(group, cycle) for each group of modules that import each other, directly or not (a
    strongly connected component of more than one module, by Tarjan's algorithm), with one of its
    cycles [a, b, ..., a]: the shortest from its first module back to it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [(group, _shortest_cycle(graph, group)) for group in groups]


def _shortest_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """Breadth-first from the group's first module back to itself, within the group."""
    start = min(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while start not in previous:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & group):
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    cycle = [start]
    node = previous[start]
    while node != start:
        cycle.append(node)
        node = previous[node]
    return [start, *reversed(cycle[1:]), start]


def _describe(group: set[str], cycle: list[str]) -> str:
    edges = [
        f"  {statement.importer} -> {statement.target} ({statement.path}:{statement.line})"
        for statement in IMPORTS
        if statement.importer in group and statement.target in group and statement.target != statement.importer
    ]
    return f"{sorted(group)} import each other, e.g. {' -> '.join(cycle)}:\n" + "\n".join(edges)


def test_the_parser_sees_the_package():
    """Guards the other tests against passing vacuously: modules and imports are found, and the
    resolution is the one the rules rely on."""
    assert {f"{PACKAGE}.api", f"{PACKAGE}.training.loop", f"{PACKAGE}.models"} <= set(MODULES)
    targets = {(statement.importer, statement.target) for statement in IMPORTS}
    assert (f"{PACKAGE}.experiments.clip_runs", f"{PACKAGE}.training.loop") in targets
    assert (f"{PACKAGE}.evaluation.suite", f"{PACKAGE}.data.templates") in targets
    assert (f"{PACKAGE}.evaluation.suite", f"{PACKAGE}.models") in targets


def test_import_cycles_finds_cycles_and_only_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [({"a", "b", "c"}, ["a", "b", "c", "a"])]
    # Two cycles through one module are one group; the cycle shown is a shortest one.
    graph = {"p": {"t", "w"}, "t": {"p"}, "w": {"x"}, "x": {"p"}}
    assert import_cycles(graph) == [({"p", "t", "w", "x"}, ["p", "t", "p"])]


def test_no_import_cycles():
    cycles = import_cycles(_internal_graph())
    assert not cycles, "import cycles:\n" + "\n".join(_describe(group, cycle) for group, cycle in cycles)


def test_only_the_programs_that_train_import_training():
    offending = [
        str(statement)
        for statement in IMPORTS
        if (statement.target == TRAINING or statement.target.startswith(TRAINING + "."))
        and not (statement.importer == TRAINING or statement.importer.startswith(TRAINING + "."))
        and statement.importer not in TRAINING_IMPORTERS
    ]
    allowed = ", ".join(sorted(TRAINING_IMPORTERS))
    assert not offending, f"outside clip_jax/training, only {allowed} may import it:\n" + "\n".join(offending)


def test_imports_inside_functions_are_only_heavy_optional_dependencies():
    offending = [
        str(statement)
        for statement in IMPORTS
        if statement.in_function
        and statement.target not in HEAVY_OPTIONAL
        and not statement.path.startswith(FUNCTION_LEVEL_IMPORTS_IN_PROGRESS)
    ]
    assert not offending, "move these imports to the top of their module:\n" + "\n".join(offending)


def layer_of(module: str) -> int:
    """The index in LAYERS of a clip_jax module: that of the longest name in LAYERS it is or lies
    under ("" is the package itself)."""
    best, best_length = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            full = f"{PACKAGE}.{name}" if name else PACKAGE
            if (module == full or (name and module.startswith(full + "."))) and len(full) > best_length:
                best, best_length = index, len(full)
    if best is None:
        raise KeyError(f"module {module} is in no layer of LAYERS")
    return best


def upward_imports(imports: list[Import]) -> list[str]:
    """Each import of a clip_jax module by one of a lower layer, in words."""
    return [
        f"{statement} (layer {layer_of(statement.importer)} imports layer {layer_of(statement.target)})"
        for statement in imports
        if statement.target in MODULES and layer_of(statement.target) > layer_of(statement.importer)
    ]


def test_every_module_has_a_layer():
    unplaced = []
    for module in MODULES:
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"add these modules to LAYERS: {sorted(unplaced)}"


def test_the_layer_check_finds_an_import_that_runs_up():
    """Guards the rule against passing vacuously: an import of evaluation/ from data/ (one of the
    three that ran up before clip_jax.io) is reported, one down is not."""
    up = Import(
        f"{PACKAGE}.data.classification", "clip_jax/data/classification.py", 1, "x", f"{PACKAGE}.evaluation", False
    )
    down = Import(f"{PACKAGE}.api", "clip_jax/api.py", 1, "x", f"{PACKAGE}.io.loading", False)
    assert layer_of(f"{PACKAGE}.io.loading") == layer_of(f"{PACKAGE}.io") < layer_of(f"{PACKAGE}.api")
    assert layer_of(PACKAGE) == len(LAYERS) - 1
    assert [line.split(" (")[0] for line in upward_imports([up, down])] == [str(up)]


def test_no_import_runs_up_the_layers():
    offending = upward_imports(IMPORTS)
    assert not offending, "imports that run up the layers (see LAYERS):\n" + "\n".join(offending)
