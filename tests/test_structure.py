"""The project's modules import each other in one direction: no circle, no library module importing a script."""
import ast
import os

from conftest import ROOT

def local_imports():
    """{module: set of the project's modules it imports, at the top or inside functions}."""
    modules = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    graph = {}
    for module in modules:
        tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        graph[module] = names & modules - {module}
    return graph


def test_no_module_imports_itself_through_others():
    graph = local_imports()

    def reaches(start, goal, seen=()):
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen + (nxt,))) for nxt in graph[start])
    assert [module for module in graph if reaches(module, module)] == []


def test_library_modules_import_no_script_and_the_bottom_imports_nothing_of_ours():
    """Scripts (a file with main()) may use each other's functions; a library module uses none of them."""
    graph = local_imports()
    scripts = {module for module in graph if "\ndef main(" in open(os.path.join(ROOT, module + ".py")).read()}
    assert {"TrainUnetDataSet", "predict_unet_test", "plot", "evaluate", "inspect_data"} <= scripts
    assert {module: graph[module] & scripts for module in graph if module not in scripts and graph[module] & scripts} == {}
    assert graph["files"] == graph["cli"] == graph["backend"] == set()
    assert graph["TrainUnetDataSet"] & scripts == set()  # training draws its curves with curves.py, as plot.py does
