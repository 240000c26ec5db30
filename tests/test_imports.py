"""The package's import graph: no module imports another module's private names, and the
layers import only downward.

The rule (docs/design.md, "Validation"): a name with a leading underscore is private to the module
that defines it. No module of ``diffmath`` (``kernels/`` is installed as ``diffmath.kernels``)
may import a private name (``from .x import _y``, ``from diffmath.x import _y``) from another
module of the package; what several modules share is public in the module that owns it (the
argument checks in ``diffmath.checks``). A private MODULE (``_array``, ``_io``,
``samplers/_common``, ``kernels/_common``, ``kernels/_affine``, ``kernels/_tile``,
``nn/_labels``) is the internals of the package that contains it: modules of that package and
of its subpackages may import its public names, modules outside that package may not. The
parser walks every import statement, including the ones inside functions.

The layers (docs/design.md, "Layers"): the math imports only numpy, scipy, torch and the math,
the pipeline sits above it, and ``cli`` / ``verify`` on top (``test_imports_point_downward``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"diffmath": ROOT / "diffmath", "diffmath.kernels": ROOT / "kernels"}


def _modules():
    for pkg, base in PACKAGES.items():
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if pkg == "diffmath" and rel and rel[0] == "kernels":
                continue
            parts = pkg.split(".") + [p for p in rel if p != "__init__"]
            yield path, ".".join(parts), rel[-1] == "__init__"


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _violations():
    bad = []
    for path, module, is_pkg in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_pkg, node)
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
                names = []
            else:
                continue
            if not targets[0].startswith("diffmath"):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and target != module:
                for n in names:
                    # a submodule imported by name (from . import _common) is judged as a module below
                    if n.startswith("_") and not n.startswith("__") and not _is_module(f"{target}.{n}"):
                        bad.append(f"{where}: private name {n} from {target}")
            for tgt in targets:
                if not _is_module(tgt):
                    continue
                parts = tgt.split(".")
                for i, p in enumerate(parts):
                    if p.startswith("_") and not p.startswith("__"):
                        owner = ".".join(parts[:i])
                        if not (module == owner or module.startswith(owner + ".")):
                            bad.append(f"{where}: private module {'.'.join(parts[: i + 1])} outside {owner}")
    return sorted(set(bad))


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "diffmath":
        return False
    if len(parts) > 1 and parts[1] == "kernels":
        base, rest = PACKAGES["diffmath.kernels"], parts[2:]
    else:
        base, rest = PACKAGES["diffmath"], parts[1:]
    p = base.joinpath(*rest) if rest else base
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def test_parser_sees_the_package():
    mods = {m for _, m, _ in _modules()}
    assert {"diffmath.checks", "diffmath.samplers.ddim", "diffmath.kernels.samplers"} <= mods
    tree = ast.parse("from ..losses import _check_variance\nfrom .._array import gather\n")
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert _resolve("diffmath.samplers.ddpm", False, imports[0]) == "diffmath.losses"
    assert _resolve("diffmath.kernels", True, imports[1]) == "diffmath._array"
    # the package diffmath.latent: its __init__ and its modules, whose `..` is diffmath
    assert {"diffmath.latent", "diffmath.latent.vae_math", "diffmath.latent.cache"} <= mods
    tree = ast.parse("from .cache import LatentCache\nfrom .._io import read_json\n")
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert _resolve("diffmath.latent", True, imports[0]) == "diffmath.latent.cache"
    assert _resolve("diffmath.latent.run", False, imports[1]) == "diffmath._io"
    assert _is_module("diffmath.latent") and _is_module("diffmath.latent.cache") and _is_module("diffmath._io")


def test_no_private_imports_across_modules():
    bad = _violations()
    assert not bad, "private imports across modules:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- layers
def _imported_modules(path, package):
    """Absolute names of the diffmath modules that the file at ``path`` (in ``package``) imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("diffmath"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("diffmath"):
                names.add(mod)
                names.update(f"{mod}.{a.name}" for a in node.names)  # `from . import train`
    return names


def _layer(parts):
    """The unit of the layer order that the module ``diffmath.<parts>`` belongs to: its top-level
    module or package, except that each module of the package diffmath.latent is one unit of its
    own ("latent.cache"), the package's __init__ being "latent"."""
    if parts[0] == "latent" and len(parts) > 1 and parts[1] != "__init__":
        return f"latent.{parts[1]}"
    return parts[0]


def test_imports_point_downward():
    # docs/design.md, "Layers": the math (and kernels/) imports only numpy, scipy, torch and the math; nn/ only torch;
    # the pipeline (diffmath/pipeline/) builds on the math, one module on the ones before it in PIPELINE_ORDER, and
    # never imports cli, the latent package or the old module paths (train, sample, ...: re-exports of the pipeline
    # that import nothing else); the modules of the package diffmath.latent build on each other one way (vae_math <-
    # vae_config <- vae_checkpoint <- vae_train <- cache <- run <- diffusion <- demo <- compare <- its __init__ <- the
    # compatibility modules latent_vae, ...) and never import cli
    from pathlib import Path

    import diffmath

    root = Path(diffmath.__file__).parent
    kernels_dir = Path(__import__("diffmath.kernels", fromlist=["x"]).__file__).parent
    latent_order = (
        "latent.vae_math",
        "latent.vae_config",
        "latent.vae_checkpoint",
        "latent.vae_train",
        "latent.cache",
        "latent.run",
        "latent.diffusion",
        "latent.demo",
        "latent.compare",
        "latent",
        "latent_vae",
        "latent_cache",
        "latent_diffusion",
        "latent_compare",
    )
    # every module of the latent package and every compatibility module has its place in the order
    assert {_layer(["latent", f.stem]) for f in (root / "latent").glob("*.py")} | {
        f.stem for f in root.glob("latent_*.py")
    } == set(latent_order)
    compat = ("train", "sample", "evaluate", "checkpoint", "data", "rundir", "_io", "plots", "distributed")
    upper = {"pipeline", *compat, *latent_order, "cli", "verify", "nn", "kernels"}
    assert {f.stem for f in (root / "pipeline").glob("*.py")} == {"__init__", *PIPELINE_ORDER}
    bad = []
    files = [(f, "diffmath" + "".join("." + p for p in f.relative_to(root).parent.parts)) for f in root.rglob("*.py")]
    files += [(f, "diffmath.kernels") for f in kernels_dir.glob("*.py")]
    for f, pkg in files:
        mod = f.stem
        top = _layer(pkg.split(".")[1:] + [mod])
        if top in ("__init__", "__main__", "cli", "verify"):  # the package's own entry points and the top layer
            continue
        imported = _imported_modules(f, pkg)
        used = {_layer(n.split(".")[1:]) for n in imported if n.count(".") >= 1}
        if top == "pipeline":
            inner = {n.split(".")[2] for n in imported if n.startswith("diffmath.pipeline.")}
            later = set(PIPELINE_ORDER[PIPELINE_ORDER.index(mod) :]) if mod in PIPELINE_ORDER else set()
            bad += [f"{f} imports diffmath.pipeline.{n}" for n in sorted(inner & later)]
            forbidden = {"cli", "verify", *latent_order, *compat}
        elif top in compat:
            forbidden = used - {"pipeline", "parameterization", "schedules"}
        elif top in latent_order:
            forbidden = {"cli", *latent_order[latent_order.index(top) + 1 :]}
        elif top == "nn":
            forbidden = {n for n in used if n != "nn"}
        else:  # the math, samplers/, oracle, likelihood, kernels/
            forbidden = upper - ({"kernels"} if top == "kernels" else set())
        bad += [f"{f} imports diffmath.{n}" for n in sorted(used & forbidden)]
    assert not bad, bad


# the pipeline's modules, each importing only those before it (docs/design.md, "Layers")
PIPELINE_ORDER = (
    "io",
    "rundir",
    "data",
    "checkpoint",
    "distributed",
    "plots",
    "config",
    "model",
    "objective",
    "optim",
    "loop",
    "loaded",
    "sampler_loops",
    "generate",
    "sample_run",
    "metrics",
    "classifier",
    "evaluate",
    "report",
    "demo",
)
