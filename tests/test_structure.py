"""The package's layers, bottom to top, each importing only the layers below it: no circle, no
library module importing a command, and the design card's scripts thin."""
import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "biounet")
LAYERS = ["core", "data", "evaluation", "model", "prediction", "training", "export", "api", "commands",
          "napari_plugin"]
DESIGN_CARD_SCRIPTS = ["unet.py", "dataloader.py", "TrainUnetDataSet.py", "predict_unet_test.py", "plot.py"]


def layer_of(module):
    """biounet.data.loader -> data; biounet.api and biounet itself -> api."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS and parts[1] != "api") else "api"


def imported_modules(path):
    """The biounet modules a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] == "biounet"}


def package_files():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield "biounet." + os.path.relpath(path, ROOT)[len("biounet/"):-3].replace(os.sep, "."), path


def test_every_module_of_the_package_sits_in_a_layer():
    assert {layer_of(module) for module, _ in package_files()} <= set(LAYERS)
    assert {name for name in os.listdir(PACKAGE) if os.path.isdir(os.path.join(PACKAGE, name))} - {"__pycache__"} \
        == set(LAYERS) - {"api"}


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, path in package_files():
        own = LAYERS.index(layer_of(module))
        upward += [f"{module} imports {name}" for name in imported_modules(path)
                   if LAYERS.index(layer_of(name)) > own]
    assert upward == []


def test_no_module_imports_itself_through_others():
    graph = {module: {name for name in imported_modules(path)} for module, path in package_files()}
    modules = set(graph)
    graph = {module: {m for m in modules if any(n == m or n.startswith(m + ".") for n in names) and m != module
                      and not m.endswith("__init__")} for module, names in graph.items()}

    def reaches(start, goal, seen=()):
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen + (nxt,))) for nxt in graph.get(start, ()))
    assert [module for module in graph if reaches(module, module)] == []


def test_the_design_card_scripts_are_thin_entry_points_and_no_other_module_sits_beside_them():
    for script in DESIGN_CARD_SCRIPTS:
        source = open(os.path.join(ROOT, script)).read()
        assert len(source.splitlines()) <= 40, script
        assert imported_modules(os.path.join(ROOT, script)), f"{script} imports nothing of the package"
    assert sorted(name for name in os.listdir(ROOT) if name.endswith(".py")) == sorted(DESIGN_CARD_SCRIPTS)


def test_no_file_of_the_package_is_over_500_lines():
    long = {module: n for module, path in package_files() if (n := len(open(path).read().splitlines())) > 500}
    assert long == {}
