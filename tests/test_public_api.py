"""The package uses Lightning, jsonargparse and W&B through their public API only.

A name with a leading underscore is theirs to change in any release (``LightningCLI._add_subcommands``,
``Trainer._accelerator_connector``); code that reads one breaks on an upgrade without a deprecation.
"""

import ast
import importlib
import inspect
import textwrap
from collections.abc import Iterator
from pathlib import Path

import moei_lightning

PACKAGE = Path(moei_lightning.__file__).parent
LIBRARIES = ("lightning", "pytorch_lightning", "jsonargparse", "wandb")
ATTRIBUTE_FUNCTIONS = ("getattr", "hasattr", "setattr", "delattr")
OTHER_LIBRARIES = {
    # transformers' models name their decoder-block classes here (what accelerate and FSDP auto-wrap read);
    # transformers has no public accessor for it, and it is not an object of the libraries checked here.
    "_no_split_modules",
    # lm-eval's HFLM hook for generation, which its own subclasses (lm_eval/models/hf_steered.py) override and call
    # through super(); MoEILM adds synced_gpus there. lm-eval is not one of the libraries checked here.
    "_model_generate",
}


def private(name: str) -> bool:
    """One leading underscore; ``__init__`` and other dunder names are Python's protocol, not private."""
    return name.startswith("_") and not name.endswith("__")


OPTIONAL_EXTRAS = {"lm_eval"}
"""Packages of the project's optional extras: a module that needs one is checked as text only without it."""


def modules() -> Iterator[tuple[str, Path]]:
    """Every module of the package, by name and file (``__main__`` runs the command line when imported)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def on_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def private_accesses(tree: ast.AST) -> Iterator[str]:
    """``x._name`` for any ``x`` but ``self``/``cls`` (``super()._name`` included), and ``getattr(x, "_name")``."""
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute) and not on_self(node):
            name = node.attr
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTRIBUTE_FUNCTIONS:
            argument = node.args[1] if len(node.args) > 1 else None
            name = argument.value if isinstance(argument, ast.Constant) else None
        if isinstance(name, str) and private(name) and name not in OTHER_LIBRARIES:
            yield f"{node.lineno}: {ast.unparse(node)}"


def own_names(cls: type) -> tuple[set[str], set[str]]:
    """The private names ``cls``'s own code defines (methods, class attributes, ``self.<name> = ...``), and the
    private ``self.<name>`` it reads."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    defined, read = set(), set()
    for statement in node.body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            defined.add(statement.name)
        elif isinstance(statement, ast.Assign | ast.AnnAssign):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            defined |= {target.id for target in targets if isinstance(target, ast.Name)}
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and on_self(child):
            (defined if isinstance(child.ctx, ast.Store) else read).add(child.attr)
    return {name for name in defined if private(name)}, {name for name in read if private(name)}


def library_internals_used(cls: type) -> Iterator[str]:
    """Private names of a Lightning/jsonargparse/W&B base class that ``cls`` overrides, assigns or reads."""
    library = [base for base in cls.__mro__[1:] if base.__module__.split(".")[0] in LIBRARIES]
    if not library:
        return
    ours: set[str] = set()
    for k in cls.__mro__:
        if k.__module__.startswith("moei_lightning."):
            ours |= own_names(k)[0]
    for name in sorted(ours):
        owner = next((base for base in library if hasattr(base, name)), None)
        if owner is not None:
            yield f"{cls.__qualname__} overrides {name} of {owner.__name__}"
    for name in sorted(own_names(cls)[1] - ours):
        yield f"{cls.__qualname__} reads self.{name}, which only its library base class sets"


def test_no_private_attribute_of_lightning_jsonargparse_or_wandb_is_used() -> None:
    found = []
    for name, path in modules():
        found += [f"{path.relative_to(PACKAGE.parent)}:{hit}" for hit in private_accesses(ast.parse(path.read_text()))]
        try:
            module = importlib.import_module(name)
        except ImportError as err:  # an optional extra is not installed: its module's classes cannot be inspected
            if getattr(err.__cause__ or err, "name", None) not in OPTIONAL_EXTRAS:
                raise
            continue
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == name:
                found += [f"{name}: {hit}" for hit in library_internals_used(cls)]
    assert not found, "private names of a library used (use its public API):\n" + "\n".join(found)
