"""Sphinx configuration of the skprotoad documentation.

Build (warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Before reading the sources, this file generates into ``docs/_generated/``
(ignored by git): the network figure (``draw_network.py``), the figure of
``examples/plot_quickstart.py`` (by running it) and one snippet per
benchmark that includes ``benchmarks/results/<name>.md`` when that file
exists (the path in it is relative to ``docs/benchmarks.md``, the page that
includes the snippets), so the benchmark page always shows the committed results.
"""

import os
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))

import skprotoad  # noqa: E402
from draw_network import draw_figure  # noqa: E402

project = "skprotoad"
author = "skprotoad developers"
copyright = "skprotoad developers"
release = skprotoad.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
autosummary_ignore_module_all = False  # document exactly each module's __all__
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"  # the numpydoc docstrings describe the types
# Module constants are shown with their value, except these (too long to print).
autosummary_context = {"hide_values": ["skprotoad.plotting.COLORMAPS"]}
numpydoc_show_class_members = False  # members are listed by the class template
numpydoc_validation_checks = set()

html_theme = "furo"
html_title = f"skprotoad {release}"
html_static_path = ["_static"]

# ---------------------------------------------------------------- generated
GENERATED = DOCS / "_generated"
RESULTS = ROOT / "benchmarks" / "results"

# name -> (what it measures, command to rerun)
BENCHMARKS = {
    "magnetic_tile": (
        "ProtoADDetector on the Magnetic Tile Defect data set: accuracy, "
        "threshold behaviour and speed of each variant.",
        "python benchmarks/bench_magnetic_tile.py --variants default default_seed1 "
        "default_seed2",
    ),
    "image_scores": (
        "Image-score readouts of the same prototypes on Magnetic Tile, per defect type.",
        "python benchmarks/bench_image_scores.py",
    ),
    "feature_variants": (
        "Patch-feature variants on Magnetic Tile, one factor at a time.",
        "python benchmarks/bench_feature_variants.py",
    ),
    "synthetic_variants": (
        "Alignment and neighbourhood averaging on generated data.",
        "python benchmarks/bench_synthetic_variants.py",
    ),
    "clustering_real": (
        "FINCH and k-means on real efficientnet_lite0 features of Magnetic Tile.",
        "PYTHONPATH=. python benchmarks/bench_clustering.py --real-only --output clustering_real",
    ),
    "persistence": (
        "File sizes and load times of every saved and exported format.",
        "python benchmarks/bench_persistence.py",
    ),
    "anchors": (
        "ProtoAD side by side with PatchCore and PaDiM on the same backbone.",
        "python benchmarks/bench_anchors.py",
    ),
    "clustering": (
        "FINCH and k-means: speed, peak memory and agreement with exact "
        "references.",
        "PYTHONPATH=. python benchmarks/bench_clustering.py",
    ),
    "metrics": (
        "Time and peak memory of the pixel-level metrics.",
        "PYTHONPATH=. python benchmarks/bench_metrics.py",
    ),
    "feature_cache": (
        "GridSearchCV with and without the feature cache (memory=).",
        "PYTHONPATH=. nice -n 10 python benchmarks/bench_feature_cache.py",
    ),
    "memory": (
        "Peak memory of fit on 2,000 images and memory of streamed scoring.",
        "PYTHONPATH=. nice -n 10 python benchmarks/bench_memory.py",
    ),
    "large_image": (
        "Peak memory of one very large image through CLI predict and score_samples.",
        "PYTHONPATH=. nice -n 10 python benchmarks/bench_large_image.py",
    ),
    "geometry": (
        "Input geometry on Magnetic Tile: squash and crop vs one scale factor, "
        "every pixel of every image evaluated.",
        "python benchmarks/bench_geometry.py",
    ),
    "fit_scaling": (
        "Fit time (features vs clustering) and peak memory vs number of training images.",
        "python benchmarks/bench_fit_scaling.py",
    ),
    "prototype_speed": (
        "FLOPs and CPU speed of the network vs number of prototypes.",
        "python benchmarks/bench_prototype_speed.py",
    ),
    "speed": (
        "The defaults against the backbone, PaDiM and PatchCore, one process, interleaved.",
        "python benchmarks/bench_speed.py",
    ),
    "fit": (
        "Fit seconds by stage on each shared set, and the calibration clusterings' "
        "shared neighbour search two ways.",
        "python benchmarks/bench_fit.py --against 54ab963",
    ),
    "image_readouts": (
        "The maximum, top-k means and mean of the defaults' maps as image scores, on "
        "the suite's sets.",
        "python benchmarks/bench_image_readouts.py",
    ),
    "score_union": (
        "The image score in the plain and a whitened metric at once, each standardised "
        "by the held-out normal scores: a lead, not taken yet.",
        "python benchmarks/bench_score_union.py",
    ),
    "position_spread": (
        "The image score less each position's normal mean and divided by its spread "
        "(PaDiM's per-position statistics): tried, not taken.",
        "python benchmarks/bench_position_spread.py",
    ),
    "cluster_spread": (
        "The anomaly map's distance divided by the nearest prototype's cluster spread: "
        "tried, not taken.",
        "python benchmarks/bench_cluster_spread.py",
    ),
    "map_metric": (
        "The anomaly map measured with the finest stage's channels whitened, the "
        "prototypes and image score kept: the study behind map_metric='whitened'.",
        "python benchmarks/bench_map_metric.py",
    ),
    "rounding": (
        "The defaults fitted on the same training images with their features moved in "
        "the last bits: how far float rounding alone moves the results.",
        "python benchmarks/bench_rounding.py --sets magnetic_tile bsdata_pitting --max-train 0",
    ),
    "head_precision": (
        "The prototype head searched in bfloat16 and rescored in float32, against float32.",
        "python benchmarks/bench_head_precision.py",
    ),
    "suite": (
        "The real-data suite: settings and peers on every data set at hand.",
        "python benchmarks/bench_suite.py --settings defaults paper --seeds 0 1 2 "
        "--max-train 200",
    ),
    "paired_auroc": (
        "Image-AUROC differences between settings on the same test images, with "
        "bootstrap intervals over the test images.",
        "python benchmarks/bench_paired_auroc.py",
    ),
    "global_shift": (
        "Global statistics against the image labels (acquisition-bias check).",
        "python benchmarks/bench_global_shift.py",
    ),
    "feature_maps": (
        "Linear maps of the patch features (whitening, PCA) on the suite: a lead, not taken.",
        "python benchmarks/bench_feature_maps.py",
    ),
    "stage_aggregation": (
        "The 3 x 3 aggregation on some backbone stages only, or beside the stages as they "
        "are: leads, not taken.",
        "python benchmarks/bench_stage_aggregation.py",
    ),
    "synthetic_selection": (
        "Synthetic anomalies on held-out normal images to choose a setting per set: a lead.",
        "python benchmarks/bench_synthetic_selection.py",
    ),
    "real_cost": (
        "What a real-data fit and a prediction on files cost.",
        "python benchmarks/bench_real_cost.py",
    ),
    "export": (
        "The exported whole-pipeline model next to the estimator: parity and speed.",
        "python benchmarks/bench_export.py",
    ),
    "gpu": (
        "ProtoADDetector on a GPU: fit time and scoring throughput.",
        "python benchmarks/bench_gpu.py",
    ),
}


def _benchmark_snippet(name):
    _, command = BENCHMARKS[name]
    md = RESULTS / f"{name}.md"
    if md.is_file():
        return (
            f"```{{include}} ../benchmarks/results/{name}.md\n"
            f":heading-offset: 2\n```\n"
        )
    return (
        f":::{{note}}\nNot measured yet in this version of the repository: "
        f"`benchmarks/results/{name}.md` will appear here once\n\n"
        f"    {command}\n\nhas been run and its results committed.\n:::\n"
    )


def _run_quickstart():
    """Run examples/plot_quickstart.py so the examples page shows its figure.

    Skipped when the figure is newer than the script and the package; takes
    a few seconds on a CPU otherwise (offline backbone, 64 px images).
    """
    script = ROOT / "examples" / "plot_quickstart.py"
    figure = GENERATED / "quickstart_overlay.png"
    sources = [script, *sorted((ROOT / "skprotoad").glob("*.py"))]
    if figure.is_file() and figure.stat().st_mtime > max(p.stat().st_mtime for p in sources):
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # one thread: the model is tiny, and competing OpenMP threads on a busy
    # machine cost far more than they gain
    env.setdefault("OMP_NUM_THREADS", "1")
    subprocess.run([sys.executable, str(script), str(GENERATED)], check=True, env=env,
                   cwd=str(ROOT), stdout=subprocess.DEVNULL)


def _generate():
    GENERATED.mkdir(exist_ok=True)
    draw_figure(GENERATED / "protoad_network.png")
    _run_quickstart()
    for name in BENCHMARKS:
        text = _benchmark_snippet(name)
        path = GENERATED / f"bench_{name}.md"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


_generate()


# ------------------------------------------------------------ autodoc hooks
def _drop_inherited_type_docstring(app, what, name, obj, options, lines):
    """Module constants without a ``#:`` doc comment would otherwise show the
    docstring of their type (``tuple``, ``str``): show only their value.

    Runs before numpydoc (priority 400 < 500), on the raw docstring lines.
    """
    type_doc = (type(obj).__doc__ or "").strip()
    first = next((line.strip() for line in lines if line.strip()), "")
    if what in ("data", "attribute") and type_doc and first == type_doc.splitlines()[0].strip():
        lines.clear()


def setup(app):
    app.connect("autodoc-process-docstring", _drop_inherited_type_docstring, priority=400)
